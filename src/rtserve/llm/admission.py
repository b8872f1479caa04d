"""Admission control: refuse a request at once when the queue in front of the batch is full,
rather than queue it to time out later (the server answers 429 with ``Retry-After``).

Two limits. ``max_waiting`` counts the sequences that would have to wait for one of the batch's
``max_num_seqs`` slots: admitted sequences not yet ended, beyond ``max_num_seqs``. ``max_waiting: 0``
admits a request only into a free slot, so an admitted request starts at the next step: its TTFT
stays that of a full batch however heavy the overload (``benchmarks/llm_admission.py``).
``max_waiting_tokens`` counts the prompt tokens of sequences admitted and not yet started (the
prefill backlog). Nothing in flight admits any request, so a request the model can run
(``Scheduler.check``) is never refused forever. Preempted sequences go back to the waiting queue but
are not counted again: they were admitted already.

Thread safety. ``admit`` runs on the event loop (or any front-end thread) while the engine thread
owns the scheduler's lists, so the queue is never measured by reading those lists. Each counter has
exactly one writer:

- ``num_admitted`` / ``num_admitted_tokens``: only ``admit``, under ``_lock`` (one writer at a time),
  a lock that front-end threads take and the engine thread never does: admitting never waits on a step;
- ``num_started`` / ``num_started_tokens`` / ``num_ended``: only the engine thread (``started``,
  ``ended``).

A counter with one writer loses no update. Invariant: a sequence is counted as admitted before it is
posted to the engine's inbox, and counted as started (ended) only after it has left the waiting queue
(the engine), so ``num_admitted - num_started`` (``- num_ended``) is never below the real number of
admitted sequences waiting (in flight): a reader that races with the engine thread can only
overstate them and refuse a request early, never admit one past a limit.
"""
from __future__ import annotations

import threading

from .sequence import Sequence


class Overloaded(Exception):
    """The queue in front of the batch is at a limit: the request was not queued (the server answers 429)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdmissionControl:
    """Counts the sequences admitted, started and ended, and refuses requests over the limits.

    Args:
        max_waiting: sequences waiting for a slot (in flight beyond ``max_num_seqs``) beyond which
            requests are refused (None: no limit; 0: admit only into a free slot).
        max_waiting_tokens: prompt tokens admitted and not yet started beyond which requests are
            refused (``n`` choices count ``n`` times; None: no limit).
        max_num_seqs: the batch's slots.
    """

    def __init__(self, max_waiting: int | None, max_waiting_tokens: int | None, max_num_seqs: int) -> None:
        self.max_waiting, self.max_waiting_tokens = max_waiting, max_waiting_tokens
        self.max_num_seqs = max_num_seqs
        self.num_admitted = self.num_admitted_tokens = 0  # written by admit() only
        self.num_started = self.num_started_tokens = 0    # written by the engine thread only
        self.num_ended = 0                                # written by the engine thread only
        self._lock = threading.Lock()

    @property
    def num_waiting(self) -> int:
        """Sequences admitted and not yet started (never below the true count; see the module)."""
        return self.num_admitted - self.num_started

    @property
    def num_in_flight(self) -> int:
        """Sequences admitted and not yet ended (never below the true count)."""
        return self.num_admitted - self.num_ended

    @property
    def num_waiting_tokens(self) -> int:
        return self.num_admitted_tokens - self.num_started_tokens

    def admit(self, seqs: list[Sequence]) -> None:
        """Count a request's sequences in, or raise Overloaded naming the limit (nothing counted).
        Call from the front end, right before the sequences are posted to the engine."""
        tokens = sum(s.num_prompt_tokens for s in seqs)
        with self._lock:
            # read each engine-thread counter once: the engine thread may raise them meanwhile (only ever
            # up), and a stale one only overstates the queue
            in_flight, waiting_tokens = self.num_in_flight, self.num_waiting_tokens
            if in_flight > 0:
                queued = in_flight + len(seqs) - self.max_num_seqs
                if self.max_waiting is not None and queued > self.max_waiting:
                    raise Overloaded(f"the model is overloaded: {in_flight} sequences are in flight for "
                                     f"{self.max_num_seqs} batch slots (engine.max_waiting is {self.max_waiting}: "
                                     "the most that may wait for a slot); retry later")
                if self.max_waiting_tokens is not None and waiting_tokens + tokens > self.max_waiting_tokens:
                    raise Overloaded(f"the model is overloaded: {waiting_tokens} prompt tokens are waiting to "
                                     f"start, {tokens} more would pass engine.max_waiting_tokens "
                                     f"({self.max_waiting_tokens}); retry later")
            for s in seqs:
                s.admitted = True
            self.num_admitted += len(seqs)
            self.num_admitted_tokens += tokens

    def started(self, seq: Sequence) -> None:
        """Engine thread: ``seq`` left the waiting queue (first scheduled, or ended before it ran).
        Sequences that were never admitted (the offline ``LLM.generate``) are not counted."""
        if seq.admitted:
            seq.admitted = False
            self.num_started += 1
            self.num_started_tokens += seq.num_prompt_tokens
            seq.in_flight = True

    def ended(self, seq: Sequence) -> None:
        """Engine thread: ``seq`` finished (after ``started``): its slot is free."""
        if seq.in_flight:
            seq.in_flight = False
            self.num_ended += 1
