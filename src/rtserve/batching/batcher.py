"""Dynamic batcher: a bounded priority queue per model, gathered into batches that run on the
model's instances, each instance one batch at a time, instances side by side.

Policy (see docs/architecture.md):
- An idle instance takes what is waiting at once, up to ``max_batch_size``; requests that arrive
  while every instance is busy gather into the next batch. ``max_queue_delay_ms`` is an upper bound:
  an idle instance holds a partial batch only when the recent arrival rate predicts that the batch
  fills within the time the oldest request has left, so a lone request is never delayed.
- With preferred batch sizes, a batch is cut to the largest preferred size when another idle
  instance takes the rest at once (no latency cost), and the fill target is the next preferred size.
- Requests whose deadline passes while queued are answered with ``DeadlineExceeded`` by a timer and
  never computed; a cancelled request (client gone) is dropped before it runs.
- A full queue raises ``QueueFull`` (HTTP 503 + Retry-After) at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections import deque
from typing import Callable, Sequence

import numpy as np

from ..errors import BackendError, DeadlineExceeded, InvalidInput, QueueFull, RtserveError, Unavailable
from ..config import BatchingConfig
from ..metrics import ModelMetrics
from .queue import RequestQueue
from .request import InferRequest, RequestState

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _execute(run: RunFn, batch: list[InferRequest], batched: bool) -> tuple[list[dict], float]:
    """In an executor thread: concatenate inputs, run, slice outputs back per request."""
    t0 = time.perf_counter()
    if not batched or len(batch) == 1:
        inputs = batch[0].inputs
    else:
        inputs = {k: np.concatenate([r.inputs[k] for r in batch]) for k in batch[0].inputs}
    outputs = run(inputs)
    if not batched or len(batch) == 1:
        per_request = [outputs]
    else:
        per_request, start = [], 0
        for r in batch:
            end = start + r.batch_size
            per_request.append({k: v[start:end] for k, v in outputs.items()})
            start = end
    return per_request, time.perf_counter() - t0


class DynamicBatcher:
    """Queue + batch formation + dispatch for one model version.

    Args:
        name: model name (for messages).
        runners: one ``run(inputs) -> outputs`` callable per instance.
        max_batch_size: 0 = the model does not batch: each request runs alone, as given.
        config: the batching policy.
        metrics: where queue, compute and batch figures are recorded (optional).
    """

    def __init__(self, name: str, runners: Sequence[RunFn], max_batch_size: int,
                 config: BatchingConfig, metrics: ModelMetrics | None = None) -> None:
        self.name = name
        self.runners = list(runners)
        self.max_batch_size = max_batch_size
        self.config = config
        self.metrics = metrics
        self.queue = RequestQueue(config.max_queue_size, config.priority_levels)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self.runners), thread_name_prefix=f"rtserve-{name}")
        self._seq = itertools.count()
        self._idle: deque[asyncio.Future] = deque()
        self._fill_waiter: asyncio.Future | None = None
        self._workers: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_arrival = 0.0
        self._gap_ewma = float("inf")  # seconds between arrivals, smoothed
        self.num_running = 0
        self._closed = False
        if metrics is not None:
            metrics.queue_depth.set_function(lambda: self.queue.num_queued)
            metrics.in_flight.set_function(lambda: self.num_running)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._workers = [self._loop.create_task(self._worker(run), name=f"{self.name}-instance-{i}")
                         for i, run in enumerate(self.runners)]

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running. Returns False on timeout."""
        end = time.monotonic() + timeout_s
        while self.queue.num_queued or self.num_running:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        """Stop the workers; requests still queued are answered with 503."""
        self._closed = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while (req := self.queue.peek()) is not None:
            self.queue.take(1, None, 1 << 62)
            req.fail(Unavailable(f"model '{self.name}' was unloaded before the request ran"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- submission --------------------------------------------------------------------------
    def submit(self, req: InferRequest) -> asyncio.Future:
        """Queue ``req`` and return the future of its outputs. Raises at once when it cannot queue."""
        if self._closed:
            raise Unavailable(f"model '{self.name}' is not serving")
        if self.max_batch_size and req.batch_size > self.max_batch_size:
            raise InvalidInput(
                f"model '{self.name}': batch size {req.batch_size} exceeds max_batch_size {self.max_batch_size}")
        if not 0 <= req.priority < self.config.priority_levels:
            raise InvalidInput(
                f"model '{self.name}': priority {req.priority} is not in 0..{self.config.priority_levels - 1}")
        if self.queue.full:
            self.reject_full()
        loop = self._loop
        now = loop.time()
        req.arrival = now
        req.seq = next(self._seq)
        req.future = loop.create_future()
        timeout = req.timeout_s if req.timeout_s is not None else (self.config.default_timeout_ms / 1000 or None)
        if timeout:
            req.deadline = now + timeout
            req.timer = loop.call_at(req.deadline, self._expire, req)
        gap = now - self._last_arrival
        self._gap_ewma = gap if self._gap_ewma == float("inf") else 0.8 * self._gap_ewma + 0.2 * gap
        self._last_arrival = now
        self.queue.push(req)
        if self._idle:
            w = self._idle.popleft()
            if not w.done():
                w.set_result(None)
        elif self._fill_waiter is not None and not self._fill_waiter.done():
            self._fill_waiter.set_result(None)
        return req.future

    def reject_full(self) -> None:
        if self.metrics:
            self.metrics.failed("queue_full")
        raise QueueFull(f"model '{self.name}': queue is full ({self.queue.max_size} requests waiting)")

    def cancel(self, req: InferRequest) -> None:
        if req.cancel():
            self.queue.forget()
            if self.metrics:
                self.metrics.failed("cancelled")

    def _expire(self, req: InferRequest) -> None:
        if req.state is RequestState.QUEUED:
            self.queue.forget()
            req.fail(DeadlineExceeded(
                f"model '{self.name}': request timed out after {(req.deadline - req.arrival) * 1000:.0f} ms in the queue"))
            if self.metrics:
                self.metrics.failed("timeout")

    # -- batch formation ---------------------------------------------------------------------
    def _fill_target(self, available: int) -> int:
        for size in self.config.preferred_batch_sizes:
            if size > available:
                return min(size, self.max_batch_size)
        return self.max_batch_size

    async def _wait_to_fill(self) -> None:
        """Hold a partial batch while arrivals predict it fills within the oldest request's bound."""
        delay = self.config.max_queue_delay_ms / 1000
        loop = self._loop
        while True:
            oldest = self.queue.peek()
            available = self.queue.num_queued
            if oldest is None or available >= self._fill_target(available):
                return
            remaining = oldest.arrival + delay - loop.time()
            if remaining <= 0 or (self._fill_target(available) - available) * self._gap_ewma > remaining:
                return
            self._fill_waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._fill_waiter, remaining)
            except asyncio.TimeoutError:
                return
            finally:
                self._fill_waiter = None

    def _take_batch(self) -> list[InferRequest]:
        if not self.max_batch_size:
            return self.queue.take(1, None, 1 << 62)
        budget = self.max_batch_size
        preferred = self.config.preferred_batch_sizes
        if preferred and self._idle:
            fitting = [s for s in preferred if s <= self.queue.num_queued]
            if fitting and self.queue.num_queued > fitting[-1]:
                budget = min(budget, fitting[-1])  # the rest goes to the idle instance now
        return self.queue.take(budget, None, budget)

    async def _worker(self, run: RunFn) -> None:
        loop = self._loop
        batched = self.max_batch_size > 0
        while not self._closed:
            if not self.queue.num_queued:
                w = loop.create_future()
                self._idle.append(w)
                await w
                continue
            if batched and self.config.max_queue_delay_ms > 0:
                await self._wait_to_fill()
            batch = self._take_batch()
            if not batch:
                continue
            if self._idle and self.queue.num_queued:  # leftovers: hand them to an idle instance
                self._idle.popleft().set_result(None)
            await self._run_batch(run, batch, batched)

    async def _run_batch(self, run: RunFn, batch: list[InferRequest], batched: bool) -> None:
        loop = self._loop
        now = loop.time()
        m = self.metrics
        for r in batch:
            r.state = RequestState.RUNNING
            r.started = now
            if r.timer is not None:
                r.timer.cancel()
            if m:
                m.queue_s.observe(now - r.arrival)
        self.num_running += 1
        try:
            per_request, compute_s = await loop.run_in_executor(self._pool, _execute, run, batch, batched)
        except RtserveError as e:
            for r in batch:
                r.fail(e)
            if m:
                m.failed("backend")
            return
        except Exception as e:  # a backend fault answers every request in the batch
            err = BackendError(f"model '{self.name}': backend failed: {type(e).__name__}: {e}")
            for r in batch:
                r.fail(err)
            if m:
                m.failed("backend")
            return
        finally:
            self.num_running -= 1
        if m:
            m.compute_s.observe(compute_s)
            m.executions.inc()
            items = sum(r.batch_size for r in batch)
            m.items.inc(items)
            m.batch_size.observe(items)
        for r, out in zip(batch, per_request):
            r.finish(out)
