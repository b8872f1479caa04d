"""The engine's side of structured outputs, once per step: the bitmasks of the constrained rows
before sampling, the matchers advanced after it, and (``overlap``) the next step's masks computed on
a worker thread while the next forward pass runs (llguidance releases the GIL while it fills)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .backend import GrammarError, GrammarMatcher


@dataclass
class GrammarFault:
    """A sequence whose matcher failed: it fails with this message (status 500), the step goes on."""
    seq: object
    message: str


class GrammarStage:
    """``overlap`` computes the next masks on a worker thread during the next forward pass. Off by
    default: on CPU the forward pass already uses every core, and benchmarks/structured.py measured
    no gain (the masks cost about 3% of a step there)."""

    def __init__(self, overlap: bool = False) -> None:
        self.overlap = overlap
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def masks(self, seqs: list) -> tuple[list[torch.Tensor | None], list[GrammarFault]]:
        """One entry per sequence: its (W,) int32 bitmask, or None when it is unconstrained or its
        matcher failed (those are in the faults)."""
        self.wait()
        out: list[torch.Tensor | None] = []
        faults = []
        for s in seqs:
            m: GrammarMatcher | None = s.grammar
            mask = None
            if m is not None:
                try:
                    mask = m.next_mask()
                except GrammarError as e:
                    faults.append(GrammarFault(s, f"structured output: {e}"))
            out.append(mask)
        return out, faults

    def advance(self, seqs: list) -> list[GrammarFault]:
        """After ``Scheduler.update``: each constrained sequence that got a token and is not over
        consumes it; one whose grammar is complete finishes (``is_finished`` on its matcher)."""
        self.wait()
        faults = []
        for s in seqs:
            m: GrammarMatcher | None = s.grammar
            if m is None or s.failure is not None or m.num_consumed >= s.num_generated:
                continue
            tok = s.token_ids[-1]
            if s.is_finished and tok in s.stop_token_ids:
                continue  # EOS (allowed by the mask only where the grammar accepts) or a stop token
            try:
                m.advance(tok)
            except GrammarError as e:
                faults.append(GrammarFault(s, f"structured output: {e}"))
        return faults

    def prefetch(self, seqs: list) -> None:
        """Start computing the next masks of these running sequences (``overlap`` on)."""
        matchers = [s.grammar for s in seqs if s.grammar is not None and not s.is_finished]
        if not self.overlap or not matchers:
            return
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rtserve-grammar")
        self._pending = self._pool.submit(_fill_all, matchers)

    def wait(self) -> None:
        """Until a prefetch in flight is done (its errors surface at ``next_mask``)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _fill_all(matchers: list[GrammarMatcher]) -> None:
    for m in matchers:
        try:
            m.fill()
        except Exception:  # noqa: BLE001 - computed again (and reported) by next_mask on the engine thread
            pass
