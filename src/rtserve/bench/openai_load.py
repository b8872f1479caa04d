"""Streaming load on the OpenAI-compatible API (``/v1/completions`` or ``/v1/chat/completions``) and
the serving metrics of an LLM: TTFT, TPOT, ITL, end-to-end latency, token throughput and goodput.

The transport is loadgen's: callback-driven keep-alive connections, open loop (Poisson arrivals, times
fixed in advance by the seed, latency from the *scheduled* arrival so client-side queueing counts) or
closed loop. :class:`_StreamConn` adds what a stream needs to loadgen's connection: it decodes the
chunked body and splits it into SSE events, stamping each with its arrival time. Events are kept raw
and read only after the run (:func:`read_stream`), so the client spends its share of the CPU it shares
with the server on receiving, not on JSON.

The parts: ``openai_requests.py`` (the run's config and what each request sends),
``openai_stream.py`` (a request's record and how its stream is read: token counts, TTFT, ITL),
``openai_report.py`` (the summary). This module is the transport and the run, and where callers
import the public names from.
"""
from __future__ import annotations

import asyncio
import math
import random
import socket
from dataclasses import dataclass, field
from time import perf_counter

from .http1 import Connection, RequestSpec
from .loadgen import TIMER_LOOKAHEAD_S, TIMER_SLACK_S
from .openai_requests import SLO_KEYS, WORDS, OpenAIBenchConfig, PlannedRequest, RequestPlanner, load_prompts
from .openai_stream import RequestRecord, SSEParser, read_stream
from .result import LoadResult
from .runner import Runner

__all__ = ["SLO_KEYS", "WORDS", "OpenAIBenchConfig", "OpenAIBenchResult", "PlannedRequest", "RequestPlanner",
           "RequestRecord", "SSEParser", "arrival_times", "load_prompts", "read_stream", "run_openai_load",
           "run_openai_load_sync"]


# -- transport: loadgen's Runner and Connection, with streams -----------------------------------
class _StreamConn(Connection):
    """loadgen's :class:`~.http1.Connection`, keeping the body: chunked bodies are decoded into SSE
    events; the first bytes of any other body are kept for an error message."""

    __slots__ = ("sse", "events", "raw")

    def send(self, job) -> None:
        self.sse, self.events, self.raw = SSEParser(), [], b""
        super().send(job)

    def data_received(self, data: bytes) -> None:
        if self.job is not None and self.state != self._CHUNKED and len(self.raw) < 4096:
            self.raw += data
        super().data_received(data)

    def _chunks(self) -> bool:
        """Decode the complete chunks received so far into events; True after the last chunk."""
        buf, pos, t = self.cbuf, 0, perf_counter()
        try:
            while (eol := buf.find(b"\r\n", pos)) >= 0:
                size = int(buf[pos:eol].partition(b";")[0], 16)
                if size == 0:
                    if buf.find(b"\r\n\r\n", eol) >= 0:  # end of the (possibly empty) trailers
                        return True
                    break
                if len(buf) < eol + 2 + size + 2:
                    break
                self.events += [(t, e) for e in self.sse.feed(bytes(buf[eol + 2:eol + 2 + size]))]
                pos = eol + 2 + size + 2
        except ValueError:
            self.r.on_bad(self)
            return False
        del buf[:pos]
        return False

    def rest(self) -> bytes:
        """Body bytes that were no SSE event (an error's JSON)."""
        if self.sse.buf:
            return self.sse.buf
        i = self.raw.find(b"\r\n\r\n")
        return bytes(self.raw[i + 4:]) if i >= 0 else b""


class _StreamRunner(Runner):
    """Starts requests from a planner (each job carries its RequestRecord in its "counted"
    slot, see ``http1.Job``) and finishes the run after the last one, rather than at a fixed end time."""

    conn_class = _StreamConn

    def __init__(self, addr: str, host: str, port: int, cfg: OpenAIBenchConfig, res: LoadResult,
                 planner: RequestPlanner, t0: float, max_requests: int) -> None:
        dummy = RequestSpec("GET", "/")  # unused: start() builds every request
        super().__init__(addr, host, port, dummy, res, closed_loop=cfg.concurrency is not None, t_measure=t0,
                         t_end=math.inf, timeout_s=cfg.timeout_s, max_connections=cfg.concurrency or 4096)
        self.planner = planner
        self.t_stop = t0 + cfg.duration_s if cfg.duration_s else math.inf
        self.max_requests = max_requests
        self.records: list[RequestRecord] = []
        self.started_all = False
        self.finished = self.loop.create_future()

    def start(self, t0: float) -> None:
        plan = self.planner.plan(len(self.records))
        rec = RequestRecord(len(self.records), plan.prompt_len, plan.max_tokens, t0)
        self.records.append(rec)
        self.inflight += 1
        self.counted_inflight += 1
        self.submit((t0, rec, plan.spec.encode(self.hostport), False))

    def can_start(self, now: float) -> bool:
        return len(self.records) < self.max_requests and now < self.t_stop

    def job_done(self, job) -> None:
        self.inflight -= 1
        self.counted_inflight -= 1
        if self.closed_loop and not self.started_all:
            now = perf_counter()
            if self.can_start(now):
                self.start(now)
                return
            self.started_all = True
        self.check_finished()

    def check_finished(self) -> None:
        if self.started_all and self.inflight == 0 and not self.finished.done():
            self.finished.set_result(None)

    def on_answer(self, conn: _StreamConn, job, status: int, close: bool) -> None:
        if not self.stopped:
            job[1].finish(perf_counter(), status, conn.events, conn.rest())
        super().on_answer(conn, job, status, close)

    def fail(self, job, kind: str) -> None:
        if not self.stopped:
            job[1].fail(perf_counter(), kind)
        super().fail(job, kind)


class _Schedule:
    """Open-loop arrivals at times fixed before the run; each timer tick sends what is due."""

    def __init__(self, runner: _StreamRunner, times: list[float]) -> None:
        self.r, self.times, self.i = runner, times, 0
        self.handle: asyncio.TimerHandle | None = None

    def tick(self) -> None:
        r, times, now = self.r, self.times, perf_counter()
        while self.i < len(times) and times[self.i] <= now + TIMER_LOOKAHEAD_S:
            t = times[self.i]
            r.res.late_arrivals += now - t > TIMER_SLACK_S
            r.start(min(now, t + TIMER_SLACK_S))  # as loadgen: forgive TIMER_SLACK_S of timer lateness
            self.i += 1
        if self.i < len(times):
            self.handle = r.loop.call_later(times[self.i] - perf_counter(), self.tick)
        else:
            r.started_all = True
            r.check_finished()


def arrival_times(rate: float, t0: float, num: int | None, duration_s: float | None, seed: int) -> list[float]:
    """Poisson arrivals after ``t0``: ``num`` of them, or all before ``t0 + duration_s``."""
    rng, t, out = random.Random(seed), t0, []
    end = t0 + duration_s if duration_s else math.inf
    while num is None or len(out) < num:
        t += rng.expovariate(rate)
        if t >= end:
            break
        out.append(t)
    return out


@dataclass
class OpenAIBenchResult:
    config: OpenAIBenchConfig
    records: list[RequestRecord] = field(repr=False)
    t0: float  # start of the measured run
    duration_s: float  # from t0 to the last answer
    connections: int = 0
    reconnects: int = 0
    late_arrivals: int = 0

    def summary(self) -> dict:
        from .openai_report import summarize

        return summarize(self.records, self.duration_s, self.config.slos)


async def _run_once(host: str, addr: str, port: int, cfg: OpenAIBenchConfig) -> OpenAIBenchResult:
    res = LoadResult("closed" if cfg.concurrency else "open", cfg.concurrency, cfg.rate, cfg.duration_s or 0.0)
    t0 = perf_counter()
    times = None if cfg.concurrency else arrival_times(cfg.rate, t0, cfg.num_requests, cfg.duration_s, cfg.seed)
    r = _StreamRunner(addr, host, port, cfg, res, RequestPlanner(cfg), t0,
                      len(times) if times is not None else cfg.num_requests or 2**62)
    r.sweep()
    schedule = None
    try:
        if times is None:
            for _ in range(cfg.concurrency):
                if r.can_start(perf_counter()):
                    r.start(perf_counter())
        else:
            schedule = _Schedule(r, times)
            schedule.tick()
        await r.finished
    finally:
        if schedule is not None and schedule.handle is not None:
            schedule.handle.cancel()
        await r.shutdown()
    for rec in r.records:
        if rec.t_end is None:
            rec.fail(perf_counter(), "unanswered")
    t_last = max((rec.t_end for rec in r.records), default=t0)
    return OpenAIBenchResult(cfg, r.records, t0, t_last - t0, res.connections, res.reconnects, res.late_arrivals)


async def run_openai_load(host: str, port: int, cfg: OpenAIBenchConfig) -> OpenAIBenchResult:
    """Run ``cfg`` against ``host:port``, after ``cfg.warmup_requests`` unmeasured ones."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addr = infos[0][4][0]
    if cfg.warmup_requests:
        warm = OpenAIBenchConfig(cfg.model, cfg.chat, concurrency=min(2, cfg.warmup_requests),
                                 num_requests=cfg.warmup_requests, input_len=cfg.input_len, output_len=(8, 8),
                                 prompts_file=cfg.prompts_file, vocab_size=cfg.vocab_size, seed=cfg.seed + 7,
                                 timeout_s=cfg.timeout_s, api_key=cfg.api_key)
        await _run_once(host, addr, port, warm)
    return await _run_once(host, addr, port, cfg)


def run_openai_load_sync(host: str, port: int, cfg: OpenAIBenchConfig) -> OpenAIBenchResult:
    """:func:`run_openai_load` in a fresh event loop (uvloop when it is installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_openai_load(host, port, cfg))
    return uvloop.run(run_openai_load(host, port, cfg))
