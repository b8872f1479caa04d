"""One generation request as the scheduler sees it: token ids, progress counters, block table."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestFailure:
    """Why a request ended without its answer: the HTTP status its client gets, and the message."""

    status: int
    message: str


class FinishReason(enum.Enum):
    STOP = "stop"          # a stop token or stop string
    LENGTH = "length"      # max_tokens or max_model_len reached
    ABORT = "abort"        # cancelled (client gone) or failed


@dataclass(eq=False)
class Sequence:
    """State is counters; everything else is derived (``num_*`` properties).

    Invariant: ``num_computed_tokens <= num_tokens``; the KV of the first ``num_computed_tokens``
    tokens is in the blocks of ``block_table`` (``num_cached_tokens`` of them were found in the
    prefix cache rather than computed).
    """

    token_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()  # EOS included unless the request set ignore_eos
    arrival: float = 0.0
    priority: int = 0  # lower runs first (vLLM's convention); ties go by arrival (seq_id)
    seq_id: int = field(default_factory=lambda: next(_ids))  # creation order: arrival order
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled: float = 0.0  # time.monotonic() when it first ran (0 = not yet)
    admitted: bool = False  # counted by admission control until it first runs (admission.py)
    in_flight: bool = False  # counted by admission control from its start until it ends
    block_table: list[int] = field(default_factory=list)
    params: Any = None  # SamplingParams (kept opaque here: this module imports no torch)
    generator: Any = None  # torch.Generator for a seeded request
    grammar: Any = None  # structured.GrammarMatcher of a constrained request (params.structured)
    output_logprobs: list = field(default_factory=list)
    prompt_logprobs: int | None = None  # alternatives per prompt token when the prompt is scored (None: not)
    prompt_lps: list = field(default_factory=list)  # prompt_logprobs.PromptLogprob of tokens 1.. so far
    block_scores: dict = field(default_factory=dict)  # block index -> BlockScores, until the block is cached
    failure: RequestFailure | None = None  # set when it ended in a fault, an unload or a shutdown

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """The prompt is scored and not every prompt token has its logprob yet."""
        return self.prompt_logprobs is not None and len(self.prompt_lps) < self.num_prompt_tokens - 1

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
