"""Continuous batching: every step decides which sequences advance by how many tokens.

Policy (one step):
1. Running sequences first, oldest first: each gets the tokens it still has to compute (1 when
   decoding; the next prefill chunk otherwise), within the step's token budget. When the KV cache
   has no room, the *newest* running sequence is preempted: its blocks are freed and it goes back
   to the front of the queue, to be recomputed later (its generated tokens are kept).
2. Then waiting sequences, in order, while budget, blocks and ``max_num_seqs`` allow: each first
   takes what the prefix cache holds of its tokens (one whose prompt is scored, ``prompt_logprobs``,
   only blocks that kept their scores, and it waits a step when another scored prompt computes its
   next block in this one), then a prefill chunk of what is left.
Invariant: the tokens scheduled in a step add up to at most ``max_num_batched_tokens``.

The waiting queue is ordered by (priority, arrival): a lower ``Sequence.priority`` starts first
(vLLM's convention), equal priorities in arrival order, a preempted sequence by its own priority and
arrival. Priority only orders admission into running: no running sequence is preempted for it.
Admission control (``admit``, ``admission.py``) bounds the queue before anything reaches it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .admission import AdmissionControl, Overloaded  # noqa: F401 (raised by admit)
from .block_manager import BlockManager
from .sequence import FinishReason, Sequence, SequenceStatus


class RequestTooLarge(ValueError):
    """A request that can never be scheduled (the server answers 400 with this message)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_waiting`` / ``max_waiting_tokens``: admission limits (None: none; ``EngineConfig``
    gives the served defaults)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_waiting: int | None = None
    max_waiting_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0 or None")
        if self.max_waiting_tokens is not None and self.max_waiting_tokens < 1:
            raise ValueError("max_waiting_tokens must be >= 1 or None")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it this step, starting at seq.num_computed_tokens
    num_spec: int = 0  # of which proposed tokens at the end (speculative decoding): num_spec + 1 logits rows

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence is computed, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def to_sample(self) -> list[Sequence]:
        return [s.seq for s in self.scheduled if s.completes]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 score_accept: Callable[[Sequence, Any], bool] | None = None) -> None:
        """``score_accept(seq, block.scores)``: whether a cached block's scores serve a scored
        prompt (``prompt_logprobs.accepts``); None: scored prompts never use the prefix cache."""
        self.config = config
        self.bm = block_manager
        self.score_accept = score_accept
        self.waiting: deque[Sequence] = deque()  # by (priority, seq_id)
        self.running: list[Sequence] = []
        self.admission = AdmissionControl(config.max_waiting, config.max_waiting_tokens, config.max_num_seqs)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, seqs: list[Sequence]) -> None:
        """Count a request's sequences into the queue before they are posted to the engine, or
        raise Overloaded naming the limit. Thread-safe: the front end calls it (``admission.py``)."""
        self.admission.admit(seqs)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises RequestTooLarge if it could never run."""
        self.check(seq)
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Insert by (priority, seq_id), scanning from the back: O(1) when priorities are equal."""
        w, key = self.waiting, (seq.priority, seq.seq_id)
        i = len(w)
        while i and (w[i - 1].priority, w[i - 1].seq_id) > key:
            i -= 1
        w.insert(i, seq)

    def check(self, seq: Sequence) -> None:
        """Raise RequestTooLarge if ``seq`` could never be scheduled (safe from any thread)."""
        c = self.config
        if seq.num_prompt_tokens < 1:
            raise RequestTooLarge("the prompt is empty")
        if seq.num_prompt_tokens >= c.max_model_len:
            raise RequestTooLarge(
                f"the prompt has {seq.num_prompt_tokens} tokens; this model's maximum context is {c.max_model_len} "
                "tokens, prompt and output together")
        if self.bm.blocks_needed(seq.num_prompt_tokens + 1) > self.bm.num_blocks:
            raise RequestTooLarge(
                f"the prompt needs {self.bm.blocks_needed(seq.num_prompt_tokens + 1)} KV-cache blocks; "
                f"the cache has {self.bm.num_blocks}")
        if seq.max_tokens < 0:
            raise RequestTooLarge("max_tokens must be at least 0")

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT) -> None:
        """End a sequence wherever it is (client gone, or a stop string seen after the step);
        its blocks are freed at once."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.admission.started(seq)  # when it ends before it ever ran
        self.admission.ended(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)  # ahead of every later arrival of its priority

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: nothing after it is left
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        if out.preempted:
            return out  # no room: admit nobody new this step
        self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Start waiting sequences in order while the budget and the batch slots last. A scored
        prompt takes cached blocks only when they carry scores (``score_accept``); one whose next
        full block another scored prompt computes in this very step waits a step, and then finds
        that block in the cache (lm-eval's choices share their context)."""
        computing: set[int] = set()  # full-block hashes scored prompts compute this step
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            scored = seq.needs_prompt_logits
            hashes = self.bm.prompt_block_hashes(seq) if scored and self.score_accept is not None else None
            if not seq.block_table and not scored:  # a cached prefix has no logits
                self.bm.take_cached_prefix(seq)
            elif not seq.block_table and not seq.prompt_lps and hashes is not None:
                self.bm.take_cached_prefix(seq, accept=lambda scores, seq=seq: self.score_accept(seq, scores),
                                           hashes=hashes)
            todo = self.bm.uncached_block_hashes(seq, hashes) if hashes is not None else []
            if todo and todo[0] in computing:
                self.bm.free(seq)  # back to the queue; next step it finds the block cached
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                i += 1
                continue
            n = min(seq.num_uncomputed, budget)
            if not self.bm.allocate(seq, n):
                self.bm.free(seq)  # give back cached blocks it took; retry next step
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            computing.update(todo)
            del self.waiting[i]
            self.admission.started(seq)  # after it left the queue: see admission.py's invariant
            if not seq.first_scheduled:
                seq.first_scheduled = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

    def update(self, out: SchedulerOutput, sampled: dict[int, int | list[int]]) -> list[Sequence]:
        """Apply a step's results: ``sampled`` maps seq_id -> new token for ``out.to_sample``, or a
        list: verified speculative tokens then the new one (their KV was computed this step, past
        the scheduled tokens; the proposals were taken back out of ``token_ids`` before this).
        Returns the sequences that finished in this step (their blocks are freed)."""
        finished = []
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted during the step
                continue
            completes = s.completes
            seq.num_computed_tokens += s.num_tokens
            if not completes or seq.max_tokens == 0:
                self.bm.cache_full_blocks(seq)
            if not completes:
                continue
            if seq.max_tokens == 0:  # scored, nothing to generate
                self.running.remove(seq)
                self._finish(seq, FinishReason.LENGTH)
                finished.append(seq)
                continue
            toks = sampled[seq.seq_id]
            reason = None
            for j, tok in enumerate(toks if isinstance(toks, list) else (toks,)):
                if j:  # a verified proposal: computed this step
                    seq.num_computed_tokens += 1
                seq.append_token(tok)
                if tok in seq.stop_token_ids:
                    reason = FinishReason.STOP
                elif seq.num_generated >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
                    reason = FinishReason.LENGTH
                if reason is not None:
                    break
            self.bm.cache_full_blocks(seq)  # after the verified proposals: they are computed too
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished
