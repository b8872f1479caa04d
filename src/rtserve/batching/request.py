"""One inference request as it travels through the batcher."""
from __future__ import annotations

import asyncio
import enum
from functools import cached_property
from dataclasses import dataclass, field

import numpy as np

from ..errors import RtserveError


class RequestState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class InferRequest:
    """Inputs of one request, batch dimension first when the model batches.

    ``signature`` is what must be equal for two requests to share a batch: per input, the shape
    without the batch dimension and the dtype.
    """

    inputs: dict[str, np.ndarray]
    batch_size: int
    priority: int = 0
    timeout_s: float | None = None
    future: asyncio.Future | None = None
    state: RequestState = RequestState.QUEUED
    arrival: float = 0.0  # time.monotonic() when queued
    deadline: float = float("inf")
    started: float = 0.0  # time.monotonic() when its batch began
    seq: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @cached_property
    def signature(self) -> tuple:
        """Inputs never change once queued: computed once, compared on every pop."""
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in self.inputs.items())

    def finish(self, outputs: dict[str, np.ndarray]) -> None:
        self.state = RequestState.DONE
        if self.timer is not None:
            self.timer.cancel()
        if self.future is not None and not self.future.done():
            self.future.set_result(outputs)

    def fail(self, error: RtserveError) -> None:
        self.state = RequestState.DONE
        if self.timer is not None:
            self.timer.cancel()
        if self.future is not None and not self.future.done():
            self.future.set_exception(error)
