"""The engine in a process of its own (model.yaml ``engine: {engine_core: auto}``, the default, or
``process``), measured against the engine thread (``async_engine.AsyncLLM``, ``engine_core: thread``)
for issue 13: served tok/s 1.09-1.19x the thread's (benchmarks/llm_serving.py --engine-process).

vLLM v1 runs its engine core in a separate process so that the API server's Python (HTTP parsing,
SSE formatting, the event loop) never holds the GIL the engine steps under. This module does the
same with the smallest moving parts: a child process (from a ``forkserver``) loads the model and
runs the step loop; the server side (:class:`ProcessAsyncLLM`) keeps ``AsyncLLM``'s interface.

Messages are frozen dataclasses of plain values (token ids, the request's ``SamplingParams``, the
``StreamDelta`` of each choice) over a ``multiprocessing`` pipe, never tensors. One ``Deltas``
message per engine step carries every request's new output; the server's reader thread hands it to
the event loops through the same ``Outbox`` / ``Mailbox`` as the thread engine (one loop callback
per step at most, coalesced when the loop is behind). A sender thread writes the server's messages,
so the event loop never blocks on the pipe.

The server process holds no weights: ``EngineFront`` gives ``LLMModel`` the tokenizer (prompts are
encoded and checked there), the checkpoint's config, the limits the engine reported when it loaded,
and a grammar compiler (an invalid constraint is a 400 before anything is queued). Every step's
message carries the engine's gauges (``EngineStats``), which ``/metrics`` reads.

Text is made on the API side: the engine process sends token ids only (its ``LLM`` runs with
``detokenize=False``), and the reader thread gives each choice's delta its text
(``output_text.ChoiceText``: incremental detokenization, stop strings, the characters held back while
one may be forming). A stop string ends the choice there, at the token that completed it (tokens the
engine produced past it are dropped), and an ``AbortRequest`` for that choice frees its blocks in the
engine. The engine never decodes (the parsers' kept special tokens concern the API side only).

What else differs from the thread engine: a structured-output constraint is compiled again in the
engine process when its request arrives (cached there too); ``pipeline_stages`` > 1 is refused; each
model costs a Python process (~4 s for the first, from the fork server).

Faults: a request the engine refuses (too large: 400; queue full: 429) raises from ``generate``'s
first ``__anext__`` as with the thread engine. If the engine process dies, every open request gets a
terminal 503 delta and new requests raise ``EngineClosed``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from .admission import Overloaded
from .async_engine import EngineClosed, FailAll, Stop, StreamDelta, StreamState, delta_for, fail_held, run_step
from .engine_front import EngineFront, EngineLimits
from .output_text import ChoiceText
from .sampling_params import SamplingParams
from .scheduler import RequestTooLarge
from .sequence import RequestFailure
from .stream_delivery import Mailbox, Outbox, coalesce, outbox_for

log = logging.getLogger("rtserve.llm")
READY_TIMEOUT_S = 600.0


# -- messages: server -> engine (and the thread engine's ``FailAll`` and ``Stop``) ------------------------
@dataclass(frozen=True)
class AddRequest:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    """End a request's choices (its consumer went away), or only choice ``index`` (a stop string ended it)."""
    req_id: int
    index: int | None = None


# -- messages: engine -> server ----------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The engine loaded: its process and the limits the server checks requests against."""
    pid: int
    limits: EngineLimits


@dataclass(frozen=True)
class EngineStats:
    """What ``/metrics`` reads from a scheduler (``LLMMetrics.bind``), sent with every step's output."""
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    spec: tuple[int, int, int, int] | None = None  # drafts, draft tokens, accepted, emitted


def engine_stats(llm) -> EngineStats:
    sc, bm, sp = llm.scheduler, llm.scheduler.bm, llm.speculator
    spec = None
    if sp is not None:
        st = sp.stats
        spec = (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens, st.num_emitted_tokens)
    return EngineStats(len(sc.running), len(sc.waiting), bm.usage, bm.num_prefix_queries, bm.num_prefix_hits, spec)


@dataclass(frozen=True)
class LoadFailed:
    message: str
    config_fault: bool  # a ValueError or OSError (the files or model.yaml): 400-like, as with the thread engine


@dataclass(frozen=True)
class Refused:
    """The request was not queued: ``kind`` is "too_large" (400), "overloaded" (429), "invalid" (400)
    or "error" (an unexpected fault: 500)."""
    req_id: int
    kind: str
    message: str
    retry_after_s: int = 1


@dataclass(frozen=True)
class Deltas:
    """One engine step's output: (request id, the delta of one of its choices), and the engine's
    gauges after the step."""
    items: list[tuple[int, StreamDelta]]
    stats: EngineStats


# -- the engine process --------------------------------------------------------------------------------
def core_main(path: str, engine: dict, device: str, conn) -> None:
    """The child process: load the model, then run the step loop until ``Stop`` or the pipe closes."""
    import torch

    from .engine import LLM
    from .engine_config import EngineConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    try:
        llm = LLM(Path(path), EngineConfig.from_dict(engine), device=torch.device(device), detokenize=False)
    except Exception as e:  # noqa: BLE001 - told to the server, which refuses to load the model
        conn.send(LoadFailed(f"{type(e).__name__}: {e}", isinstance(e, (ValueError, OSError))))
        conn.close()
        return
    import os

    conn.send(Ready(os.getpid(), llm.limits))
    try:
        EngineCore(llm, conn).run()
    except (EOFError, OSError, BrokenPipeError):
        pass  # the server went away
    finally:
        conn.close()


class EngineCore:
    """The step loop of the engine process: reads the server's messages between steps (blocks on the
    pipe only when idle) and sends one ``Deltas`` per step."""

    def __init__(self, llm, conn) -> None:
        self.llm, self.conn = llm, conn
        self.requests: dict[int, list] = {}        # req_id -> its sequences
        self.streams: dict[int, tuple[int, StreamState]] = {}  # seq_id -> (req_id, stream state)
        self.running = True
        self.last_stats = EngineStats()

    def run(self) -> None:
        llm, conn = self.llm, self.conn
        while self.running:
            while conn.poll(0 if llm.scheduler.has_work else None):
                self.handle(conn.recv())
                if not self.running:
                    return
            if llm.scheduler.has_work:
                self.send([d for d in (self.delta(s) for s in run_step(llm)) if d is not None])

    def send(self, items: list) -> None:
        """A step's deltas with the gauges; an empty step's only when the gauges changed."""
        stats = engine_stats(self.llm)
        if items or stats != self.last_stats:
            self.conn.send(Deltas(items, stats))
            self.last_stats = stats

    def delta(self, seq) -> tuple[int, StreamDelta] | None:
        entry = self.streams.get(seq.seq_id)
        if entry is None:
            if seq.is_finished:
                self.llm.forget(seq)
            return None
        req_id, st = entry
        d = delta_for(self.llm, st, seq)
        if seq.is_finished:
            del self.streams[seq.seq_id]
            seqs = self.requests.get(req_id, [])
            if all(s.seq_id not in self.streams for s in seqs):
                self.requests.pop(req_id, None)
        return req_id, d

    def handle(self, msg) -> None:
        llm = self.llm
        if isinstance(msg, AddRequest):
            self.add(msg)
        elif isinstance(msg, AbortRequest):
            self.abort(msg.req_id, msg.index)
        elif isinstance(msg, FailAll):
            self.send([d for d in (self.delta(s) for s in fail_held(llm, msg.failure)) if d is not None])
        elif isinstance(msg, Stop):
            self.running = False
        else:
            raise TypeError(f"unknown engine-core message {type(msg).__name__}")

    def abort(self, req_id: int, index: int | None) -> None:
        seqs = self.requests.get(req_id, [])
        for s in seqs if index is None else seqs[index:index + 1]:
            self.streams.pop(s.seq_id, None)
            self.llm.scheduler.abort(s)
            self.llm.forget(s)
        if all(s.seq_id not in self.streams for s in seqs):
            self.requests.pop(req_id, None)
        self.send([])

    def add(self, msg: AddRequest) -> None:
        llm, p = self.llm, msg.params
        try:
            if p.structured is not None:
                llm.compile_structured(p.structured)
            seqs = llm.make_sequences(msg.prompt_ids, p)
            llm.admit(seqs)
        except RequestTooLarge as e:
            self.conn.send(Refused(msg.req_id, "too_large", str(e)))
            return
        except Overloaded as e:
            self.conn.send(Refused(msg.req_id, "overloaded", str(e), e.retry_after_s))
            return
        except ValueError as e:
            self.conn.send(Refused(msg.req_id, "invalid", str(e)))
            return
        except Exception as e:  # noqa: BLE001 - this request fails (500), the engine goes on
            log.exception("could not queue a request")
            self.conn.send(Refused(msg.req_id, "error", f"{type(e).__name__}: {e}"))
            return
        self.requests[msg.req_id] = seqs
        for i, s in enumerate(seqs):
            self.streams[s.seq_id] = (msg.req_id, StreamState(i, 0))  # no text here: the API process makes it
            llm.scheduler.add(s)


def _context():
    """``forkserver``, its server preloading the engine's modules (torch and all): an engine process
    is a fork of it, so a model loads ~0.5 s after the first instead of ~5 s (a fresh interpreter
    importing torch, as ``spawn`` starts; ``torch._dynamo`` too: building a module on a device context
    imports it, 2 s), and exits without an interpreter teardown. The fork
    server itself runs no threads and has touched no device, so forking it is safe."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["rtserve.llm.engine_core", "rtserve.llm.engine", "torch._dynamo"])
    return ctx


@dataclass
class _Request:
    """An open request on the server side: where its deltas go, and each choice's text (made here)."""
    outbox: Outbox
    box: Mailbox
    texts: list[ChoiceText]


def refusal_error(r: Refused) -> Exception:
    if r.kind == "too_large":
        return RequestTooLarge(r.message)
    if r.kind == "overloaded":
        return Overloaded(r.message, r.retry_after_s)
    if r.kind == "error":
        return RuntimeError(f"the engine could not queue the request: {r.message}")
    return ValueError(r.message)


# -- the server side -----------------------------------------------------------------------------------
class ProcessAsyncLLM:
    """``AsyncLLM``'s interface over an engine process. ``engine``: the model.yaml ``engine:``
    mapping (``EngineConfig.from_dict``'s input)."""

    def __init__(self, path: str | Path, engine: dict, device: str = "cpu") -> None:
        ctx = _context()
        self._conn, child = ctx.Pipe()
        engine = {**engine, "engine_core": "thread"}  # the engine process steps on its own main thread
        self._proc = ctx.Process(target=core_main, args=(str(path), engine, device, child),
                                 name="rtserve-engine-core", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(READY_TIMEOUT_S):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not load {path} within {READY_TIMEOUT_S:.0f} s")
        try:
            first = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading {path} "
                               f"(exit code {self._proc.exitcode})") from None
        if isinstance(first, LoadFailed):
            self._proc.join(5)
            error = ValueError if first.config_fault else RuntimeError
            raise error(f"the engine process could not load the model: {first.message}")
        self.pid = first.pid
        self.front = EngineFront(path, engine, first.limits)
        self.stats = EngineStats()  # the engine's gauges after its last step (``LLMMetrics.bind_stats``)
        self._ids = itertools.count(1)
        self._reqs: dict[int, _Request] = {}
        self._outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}
        self._lock = threading.Lock()
        self._accepting, self._closed_message = True, "the engine process exited"
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="rtserve-core-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="rtserve-core-read", daemon=True)
        self._sender.start()
        self._reader.start()

    # -- requests ------------------------------------------------------------------------------------
    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """Stream the request's deltas. Raises RequestTooLarge, Overloaded or ValueError (refused by
        the engine) or EngineClosed at the first ``__anext__``."""
        if isinstance(prompt, str):
            raise TypeError("the engine process takes prompts as token ids (the server tokenizes)")
        loop = asyncio.get_running_loop()
        box = Mailbox()
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the model is not taking requests (it is unloading, or the server is shutting down)")
            outbox = outbox_for(self._outboxes, loop)
            req_id = next(self._ids)
            self._reqs[req_id] = _Request(outbox, box, [ChoiceText(self.front.tokenizer, params.stop, prompt)
                                                        for _ in range(params.n)])
            self._outq.put(AddRequest(req_id, list(prompt), params))
        done: set[int] = set()  # choices that had their last delta (a dead engine's 503 skips them)
        refused = False
        try:
            while len(done) < params.n:
                items = await box.take()
                for it in items:
                    if isinstance(it, Exception):
                        refused = True
                        raise it
                for delta in coalesce(items):
                    if delta.index in done:
                        continue
                    if delta.finish_reason is not None:
                        done.add(delta.index)
                    yield delta
        finally:
            with self._lock:
                self._reqs.pop(req_id, None)
            if len(done) < params.n and not refused:
                self._outq.put(AbortRequest(req_id))

    # -- closing -------------------------------------------------------------------------------------
    def close(self, drain_timeout_s: float = 10.0, message: str = "the model stopped serving") -> int:
        """As ``AsyncLLM.close``: refuse new requests, let running ones finish for up to
        ``drain_timeout_s``, end the rest with a 503 ``message``, stop the engine process."""
        with self._lock:
            was_accepting, self._accepting = self._accepting, False
        if not was_accepting:
            self._proc.join(30)
            return 0
        deadline = time.monotonic() + drain_timeout_s
        while self._reqs and self._proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        left = len(self._reqs)
        self._closed_message = message
        self._outq.put(FailAll(RequestFailure(503, message)))
        self._outq.put(Stop())
        self._outq.put(None)  # the sender closes its end after Stop
        self._proc.join(30)
        if self._proc.is_alive():
            log.error("the engine process %s did not stop within 30 s: killed", self.pid)
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(30)
        return left

    def shutdown(self) -> None:
        self.close(0.0, "the server is shutting down")

    # -- threads ---------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            msg = self._outq.get()
            if msg is None:
                return
            try:
                self._conn.send(msg)
            except (OSError, BrokenPipeError, ValueError):
                return  # the engine process is gone: the reader fails the open requests

    def _read_loop(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Deltas):
                self.stats = msg.stats
                with self._lock:
                    routed = [(self._reqs.get(req_id), req_id, d) for req_id, d in msg.items]
                by_outbox: dict[Outbox, list] = {}
                for r, req_id, d in routed:
                    if r is not None and (d := self._with_text(r, req_id, d)) is not None:
                        by_outbox.setdefault(r.outbox, []).append((r.box, d))
                for outbox, items in by_outbox.items():
                    outbox.push(items)
            elif isinstance(msg, Refused):
                with self._lock:
                    r = self._reqs.get(msg.req_id)
                if r is not None:
                    r.outbox.push([(r.box, refusal_error(msg))])
        self._end_all()

    def _with_text(self, r: "_Request", req_id: int, d: StreamDelta) -> StreamDelta | None:
        """``d`` with its text, made here; None once a stop string has ended its choice (the engine
        ran ahead of the stop, and is told to end it)."""
        choice = r.texts[d.index]
        if choice.stopped:
            return None
        engine_done = d.finish_reason is not None
        try:
            d = choice.apply(d)
        except Exception as e:  # noqa: BLE001 - this choice fails, the others go on
            log.exception("detokenizing a request's output failed")
            choice.stopped = True
            d = StreamDelta(d.index, "", [], None, "abort", d.num_prompt_tokens, len(choice.ids),
                            failure=RequestFailure(500, f"detokenizing the output failed: {type(e).__name__}: {e}"))
        if choice.stopped and not engine_done:
            self._outq.put(AbortRequest(req_id, d.index))
        return d

    def _end_all(self) -> None:
        """The engine process is gone: refuse new requests; every open one gets a terminal 503."""
        with self._lock:
            if self._accepting:
                log.error("the engine process %s exited (exit code %s); its open requests fail", self.pid,
                          self._proc.exitcode)
            self._accepting = False
            open_reqs = list(self._reqs.values())
        failure = RequestFailure(503, self._closed_message)
        for r in open_reqs:
            r.outbox.push([(r.box, StreamDelta(i, "", [], None, "abort", 0, 0, failure=failure))
                           for i in range(len(r.texts))])
