"""Per-request sampling parameters (OpenAI's and vLLM's names), validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .structured import StructuredSpec

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed integer, as OpenAI's API has it


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy. top_k 0 = off. logprobs = number of top alternatives to return
    (None = no logprobs). ``seed`` makes a request's tokens reproducible whatever it is batched with.
    ``priority`` orders the waiting queue, not sampling (it travels with the request's options):
    lower values start first, vLLM's convention; equal ones in arrival order. ``logit_bias``: (token id,
    bias in [-100, 100]) pairs added to the logits before penalties and logprobs (OpenAI's rule);
    the ids are checked against the vocabulary by whoever knows it (the served model).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_ranks: bool = True  # with prompt_logprobs: each token's rank too (one more pass over the logits)
    n: int = 1
    priority: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: "StructuredSpec | None" = None  # constrained decoding (llm/structured/)

    def __post_init__(self) -> None:
        def bad(field: str, why: str):
            raise ValueError(f"{field}: {why}, got {getattr(self, field)!r}")

        if self.max_tokens < 0:
            bad("max_tokens", "must be at least 0")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if self.top_k < 0:
            bad("top_k", "must be 0 (off) or positive")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        for f in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, f) <= 2.0:
                bad(f, "must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", "must be in [0, 20]")
        if not 1 <= self.n <= 64:
            bad("n", "must be in [1, 64]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be token ids (integers >= 0)")
        # each of the n sequences draws from a generator seeded with seed + its index: keep those in
        # the range torch's generators take (a 500 from the engine otherwise)
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            bad("seed", f"must be an integer in [{SEED_MIN}, {SEED_MAX}]")
        if any(not _is_int(t) or t < 0 or isinstance(b, bool) or not isinstance(b, (int, float))
               or not (math.isfinite(b) and -100 <= b <= 100) for t, b in self.logit_bias):
            bad("logit_bias", "must map token ids (integers >= 0) to biases in [-100, 100]")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            bad("logit_bias", "must name each token id once")
        if self.structured is not None and self.ignore_eos:
            # a finished grammar allows only EOS: ignoring it would force tokens past the answer
            bad("ignore_eos", "cannot be true with a structured output constraint (the answer ends at EOS)")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not -2**63 <= self.priority < 2**63:
            bad("priority", "must be a 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
