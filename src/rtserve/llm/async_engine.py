"""The async front the server drives: the engine steps on its own thread; each request streams
its deltas through an asyncio queue; a request whose consumer goes away is aborted (its blocks are
freed at the next step).

Every accepted request gets a terminal delta: its last token, or a ``failure`` (the HTTP status and
message its client is told) when its own sampling or detokenizing fails, when the forward pass of
its step fails (only that step's sequences fail; the traceback is logged; the engine goes on), or
when the engine closes (unload, reload, shutdown: ``close`` lets running requests finish for up to
its drain timeout, then fails the rest with 503, and refuses new ones at once).

New requests and aborts go through a thread-safe inbox that the engine thread drains before each
step; deltas come back through ``stream_delivery``: one loop callback per step at most, none while
the previous one is pending, and a request's stream takes all its waiting deltas as one (so a loop or
client slower than the engine gets fewer, larger chunks instead of a backlog). Why: see that module.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from .engine import LLM, StepFailed
from .sampling_params import SamplingParams
from .sequence import RequestFailure, Sequence
from .stream_delivery import Mailbox, Outbox, coalesce, outbox_for

log = logging.getLogger("rtserve.llm")


class EngineClosed(Exception):
    """The engine no longer takes requests (its model is unloading or the server shutting down)."""


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
    failure: RequestFailure | None = None  # set on the last delta of a request that failed
    prompt_logprobs: list | None = None  # scored prompts, on a choice's first delta: None, then a PromptLogprob per token
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache


@dataclass(frozen=True)
class AddSequences:
    """Inbox message: schedule a new request's sequences (its ``n`` choices)."""
    seqs: list[Sequence]


@dataclass(frozen=True)
class AbortSequences:
    """Inbox message: end a request's sequences (its consumer went away); their blocks are freed."""
    seqs: list[Sequence]


@dataclass(frozen=True)
class FailAll:
    """Inbox message: end every request the engine holds with this failure (the engine is closing)."""
    failure: RequestFailure


@dataclass(frozen=True)
class Stop:
    """Inbox message: leave the engine loop (after everything before it in the inbox)."""


InboxMessage = AddSequences | AbortSequences | FailAll | Stop


class StreamState:
    """What a choice's stream has been sent so far (``delta_for`` advances it)."""

    def __init__(self, index: int, hold: int) -> None:
        self.index, self.hold = index, hold  # hold: characters kept back (a stop string may be forming)
        self.sent_tokens = 0
        self.sent_chars = 0
        self.sent_prompt = False


class _Stream(StreamState):
    def __init__(self, outbox: Outbox, box: Mailbox, index: int, hold: int) -> None:
        super().__init__(index, hold)
        self.outbox, self.box = outbox, box


def run_step(llm: LLM) -> list[Sequence]:
    """One engine step; a fault fails the sequences it touched, never the engine."""
    try:
        return llm.step()
    except StepFailed as e:
        log.error("the forward pass failed for %d sequences of model %s", len(e.seqs), llm.path,
                  exc_info=e.error)
        failed = e.seqs
        message = f"the model's forward pass failed: {type(e.error).__name__}: {e.error}"
    except Exception as e:  # noqa: BLE001 - a fault outside the forward (scheduler, sampler setup)
        log.exception("an engine step failed for model %s", llm.path)
        failed = list(llm.scheduler.running) + list(llm.scheduler.waiting)
        message = f"the engine step failed: {type(e).__name__}: {e}"
    for s in failed:
        llm.fail(s, 500, message)
    return failed


def fail_held(llm: LLM, failure: RequestFailure) -> list[Sequence]:
    """End every sequence the engine holds (running or waiting) with ``failure``; returns them."""
    held = list(llm.scheduler.running) + list(llm.scheduler.waiting)
    for s in held:
        llm.fail(s, failure.status, failure.message)
    return held


def delta_for(llm: LLM, st: StreamState, seq: Sequence) -> StreamDelta:
    """``seq``'s new output since ``st`` was last advanced (text held back by ``st.hold`` characters
    until the sequence finishes); a finished sequence is forgotten by the engine."""
    text = llm.text_of(seq)
    done = seq.is_finished
    upto = len(text) if done else max(st.sent_chars, len(text) - st.hold)
    new_tokens = seq.generated_ids[st.sent_tokens:]
    lps = seq.output_logprobs[st.sent_tokens:] if seq.params.logprobs is not None else None
    reason = seq.finish_reason.value if done and seq.finish_reason else None
    delta = StreamDelta(st.index, text[st.sent_chars:upto], new_tokens, lps, reason,
                        seq.num_prompt_tokens, seq.num_generated,
                        max(0.0, seq.first_scheduled - seq.arrival) if seq.first_scheduled else 0.0,
                        seq.failure if done else None, num_cached_tokens=seq.num_cached_tokens)
    if seq.prompt_logprobs is not None and not st.sent_prompt and not seq.needs_prompt_logits:
        delta.prompt_logprobs, st.sent_prompt = [None, *seq.prompt_lps], True
    st.sent_tokens = seq.num_generated
    st.sent_chars = upto
    if done:
        llm.forget(seq)
    return delta


class AsyncLLM:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._inbox: deque[InboxMessage] = deque()
        self._wake = threading.Event()
        self._streams: dict[int, _Stream] = {}
        self._outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}
        self._running = True
        self._accepting = True
        self._lock = threading.Lock()  # generate's accept-and-post and close's refusal exclude each other
        self._thread = threading.Thread(target=self._run, name="rtserve-llm-engine", daemon=True)
        self._thread.start()

    def close(self, drain_timeout_s: float = 10.0, message: str = "the model stopped serving") -> int:
        """Refuse new requests, let the running ones finish for up to ``drain_timeout_s``, then end
        the rest with a 503 ``message`` and stop the engine thread. Blocking (call it off the loop);
        idempotent. Returns how many requests had to be failed."""
        with self._lock:
            if not self._accepting:
                self._thread.join(30)
                return 0
            self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        left = len({id(st.box) for st in list(self._streams.values())})
        self._post(FailAll(RequestFailure(503, message)))
        self._post(Stop())
        self._thread.join(30)
        return left

    def shutdown(self) -> None:
        self.close(0.0, "the server is shutting down")

    def _busy(self) -> bool:
        return bool(self._inbox) or self.llm.scheduler.has_work or bool(self._streams)

    def _post(self, msg: InboxMessage) -> None:
        self._inbox.append(msg)
        self._wake.set()

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """Stream the request's deltas. Raises ValueError (bad prompt) or RequestTooLarge at once."""
        loop = asyncio.get_running_loop()
        tokens = self.llm.encode(prompt)
        seqs = self.llm.make_sequences(tokens, params)
        self.llm.admit(seqs)  # RequestTooLarge (400) or Overloaded (429): nothing is queued
        box = Mailbox()
        hold = max((len(x) for x in params.stop), default=1) - 1
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the model is not taking requests (it is unloading, or the server is shutting down)")
            outbox = outbox_for(self._outboxes, loop)
            for i, s in enumerate(seqs):
                self._streams[s.seq_id] = _Stream(outbox, box, i, hold)
            self._post(AddSequences(seqs))
        remaining = len(seqs)
        try:
            while remaining:
                for delta in coalesce(await box.take()):
                    if delta.finish_reason is not None:
                        remaining -= 1
                    yield delta
        finally:
            for s in seqs:
                self._streams.pop(s.seq_id, None)
            if remaining:
                self._post(AbortSequences(seqs))

    # -- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        while self._running:
            while self._inbox:
                self._handle(self._inbox.popleft())
            if not self._running:
                break
            if not llm.scheduler.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            self._deliver([d for d in (self._delta(s) for s in self._step()) if d is not None])

    def _step(self) -> list[Sequence]:
        return run_step(self.llm)

    def _handle(self, msg: InboxMessage) -> None:
        llm = self.llm
        if isinstance(msg, AddSequences):
            for s in msg.seqs:
                llm.scheduler.add(s)
        elif isinstance(msg, AbortSequences):
            for s in msg.seqs:
                llm.scheduler.abort(s)
                llm.forget(s)
        elif isinstance(msg, FailAll):
            self._deliver([d for d in (self._delta(s) for s in fail_held(llm, msg.failure)) if d is not None])
        elif isinstance(msg, Stop):
            self._running = False
        else:
            raise TypeError(f"unknown engine inbox message {type(msg).__name__}")

    def _deliver(self, deltas: list[tuple["_Stream", StreamDelta]]) -> None:
        """A step's deltas to their loops' outboxes (at most one pending loop callback each)."""
        by_outbox: dict[Outbox, list] = {}
        for st, delta in deltas:
            by_outbox.setdefault(st.outbox, []).append((st.box, delta))
        for outbox, items in by_outbox.items():
            outbox.push(items)

    def _delta(self, seq: Sequence) -> tuple["_Stream", StreamDelta] | None:
        st = self._streams.get(seq.seq_id)
        if st is None:
            if seq.is_finished:
                self.llm.forget(seq)
            return None
        return st, delta_for(self.llm, st, seq)
