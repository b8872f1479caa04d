"""The async front the server drives: the engine steps on its own thread; each request streams
its deltas through an asyncio queue; a request whose consumer goes away is aborted (its blocks are
freed at the next step).

The event loop never takes a lock: new requests and aborts go through a thread-safe inbox that
the engine thread drains before each step, and deltas come back with ``call_soon_threadsafe`` --
once per step and loop, not once per sequence: each such call wakes the loop through its self-pipe,
and at 64 running sequences per-sequence calls cost the loop (and the GIL the engine needs) dearly.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from .engine import LLM
from .sampling_params import SamplingParams
from .sequence import FinishReason, Sequence


@dataclass
class StreamDelta:
    index: int                 # which of the request's n choices
    text: str                  # new text since the last delta
    token_ids: list[int]       # new tokens since the last delta
    logprobs: list | None      # their logprobs, when asked for
    finish_reason: str | None  # set on the choice's last delta
    num_prompt_tokens: int
    num_generated: int
    queue_s: float = 0.0       # arrival to first scheduled


@dataclass(frozen=True)
class AddSequences:
    """Inbox message: schedule a new request's sequences (its ``n`` choices)."""
    seqs: list[Sequence]


@dataclass(frozen=True)
class AbortSequences:
    """Inbox message: end a request's sequences (its consumer went away); their blocks are freed."""
    seqs: list[Sequence]


InboxMessage = AddSequences | AbortSequences


class _Stream:
    def __init__(self, loop, queue, index: int, hold: int) -> None:
        self.loop, self.queue, self.index, self.hold = loop, queue, index, hold
        self.sent_tokens = 0
        self.sent_chars = 0


class AsyncLLM:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._inbox: deque[InboxMessage] = deque()
        self._wake = threading.Event()
        self._streams: dict[int, _Stream] = {}
        self._running = True
        self._thread = threading.Thread(target=self._run, name="rtserve-llm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._running = False
        self._wake.set()
        self._thread.join(30)

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """Stream the request's deltas. Raises ValueError (bad prompt) or RequestTooLarge at once."""
        loop = asyncio.get_running_loop()
        tokens = self.llm.encode(prompt)
        seqs = self.llm.make_sequences(tokens, params)
        self.llm.admit(seqs)  # RequestTooLarge (400) or Overloaded (429): nothing is queued
        queue: asyncio.Queue = asyncio.Queue()
        hold = max((len(x) for x in params.stop), default=1) - 1
        for i, s in enumerate(seqs):
            self._streams[s.seq_id] = _Stream(loop, queue, i, hold)
        self._inbox.append(AddSequences(seqs))
        self._wake.set()
        remaining = len(seqs)
        try:
            while remaining:
                delta = await queue.get()
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            for s in seqs:
                self._streams.pop(s.seq_id, None)
            if remaining:
                self._inbox.append(AbortSequences(seqs))
                self._wake.set()

    # -- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        while self._running:
            while self._inbox:
                self._handle(self._inbox.popleft())
            if not llm.scheduler.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                stepped = llm.step()
            except Exception as e:  # a model fault ends every running request, the engine lives on
                for s in list(llm.scheduler.running) + list(llm.scheduler.waiting):
                    llm.scheduler.abort(s)
                    self._emit(s, error=f"{type(e).__name__}: {e}")
                continue
            self._deliver([d for d in (self._delta(s) for s in stepped) if d is not None])

    def _handle(self, msg: InboxMessage) -> None:
        llm = self.llm
        if isinstance(msg, AddSequences):
            for s in msg.seqs:
                llm.scheduler.add(s)
        elif isinstance(msg, AbortSequences):
            for s in msg.seqs:
                llm.scheduler.abort(s)
                llm.forget(s)
        else:
            raise TypeError(f"unknown engine inbox message {type(msg).__name__}")

    @staticmethod
    def _put_all(items: list) -> None:
        for queue, delta in items:
            queue.put_nowait(delta)

    def _deliver(self, deltas: list[tuple["_Stream", StreamDelta]]) -> None:
        """One loop callback per step and loop, carrying every delta of that loop's streams."""
        by_loop: dict = {}
        for st, delta in deltas:
            by_loop.setdefault(st.loop, []).append((st.queue, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(self._put_all, items)

    def _emit(self, seq: Sequence, error: str | None = None) -> None:
        d = self._delta(seq, error)
        if d is not None:
            self._deliver([d])

    def _delta(self, seq: Sequence, error: str | None = None) -> tuple["_Stream", StreamDelta] | None:
        st = self._streams.get(seq.seq_id)
        if st is None:
            if seq.is_finished:
                self.llm.forget(seq)
            return None
        text = self.llm.text_of(seq)
        done = seq.is_finished
        upto = len(text) if done else max(st.sent_chars, len(text) - st.hold)
        new_tokens = seq.generated_ids[st.sent_tokens:]
        lps = seq.output_logprobs[st.sent_tokens:] if seq.params.logprobs is not None else None
        reason = seq.finish_reason.value if done and seq.finish_reason else None
        if error is not None:
            reason = FinishReason.ABORT.value
        delta = StreamDelta(st.index, text[st.sent_chars:upto], new_tokens, lps, reason,
                            seq.num_prompt_tokens, seq.num_generated,
                            max(0.0, seq.first_scheduled - seq.arrival) if seq.first_scheduled else 0.0)
        st.sent_tokens = seq.num_generated
        st.sent_chars = upto
        if done:
            self.llm.forget(seq)
        return st, delta
