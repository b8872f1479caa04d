"""Admission control: refuse a request at once when the queue of requests not yet started is full,
rather than queue it to time out later (the server answers 429 with ``Retry-After``).

Two limits, both on sequences that were *admitted* and have not yet *started* (been scheduled for
the first time): ``max_waiting`` sequences and ``max_waiting_tokens`` prompt tokens. An empty queue
admits any request, so a request the model can run (``Scheduler.check``) is never refused forever.
Preempted sequences go back to the waiting queue but are not counted again: they were admitted
already, and at most ``max_num_seqs`` of them can be waiting.

Thread safety. ``admit`` runs on the event loop (or any front-end thread) while the engine thread
owns the scheduler's lists, so the queue is never measured by reading those lists. Each counter has
exactly one writer:

- ``num_admitted`` / ``num_admitted_tokens``: only ``admit``, under ``_lock`` (one writer at a time),
  a lock that front-end threads take and the engine thread never does: admitting never waits on a step;
- ``num_started`` / ``num_started_tokens``: only the engine thread (``started``).

A counter with one writer loses no update. Invariant: a sequence is counted as admitted before it is
posted to the engine's inbox, and counted as started only after it has left the waiting queue, so
``num_admitted - num_started`` is never below the real number of admitted sequences in the inbox and
the waiting queue: a reader that races with the engine thread can only overstate the queue (by the
sequences started in that instant) and refuse a request early, never admit one past a limit.
"""
from __future__ import annotations

import threading

from .sequence import Sequence


class Overloaded(Exception):
    """The waiting queue is at a limit: the request was not queued (the server answers 429)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdmissionControl:
    """Counts the sequences admitted and not yet started, and refuses those over the limits.

    Args:
        max_waiting: sequences admitted and not yet started beyond which requests are refused
            (None: no limit).
        max_waiting_tokens: the same, counted in prompt tokens (``n`` choices count ``n`` times).
    """

    def __init__(self, max_waiting: int | None, max_waiting_tokens: int | None) -> None:
        self.max_waiting, self.max_waiting_tokens = max_waiting, max_waiting_tokens
        self.num_admitted = self.num_admitted_tokens = 0  # written by admit() only
        self.num_started = self.num_started_tokens = 0    # written by the engine thread only
        self._lock = threading.Lock()

    @property
    def num_waiting(self) -> int:
        """Sequences admitted and not yet started (never below the true count; see the module)."""
        return self.num_admitted - self.num_started

    @property
    def num_waiting_tokens(self) -> int:
        return self.num_admitted_tokens - self.num_started_tokens

    def admit(self, seqs: list[Sequence]) -> None:
        """Count a request's sequences in, or raise Overloaded naming the limit (nothing counted).
        Call from the front end, right before the sequences are posted to the engine."""
        tokens = sum(s.num_prompt_tokens for s in seqs)
        with self._lock:
            # read num_started* once: the engine thread may raise them meanwhile (only ever up)
            waiting, waiting_tokens = self.num_waiting, self.num_waiting_tokens
            if waiting > 0:
                if self.max_waiting is not None and waiting + len(seqs) > self.max_waiting:
                    raise Overloaded(f"the model is overloaded: {waiting} sequences are waiting to start "
                                     f"(engine.max_waiting is {self.max_waiting}); retry later")
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
