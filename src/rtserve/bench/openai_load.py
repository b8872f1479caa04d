"""Streaming load on the OpenAI-compatible API (``/v1/completions`` or ``/v1/chat/completions``) and
the serving metrics of an LLM: TTFT, TPOT, ITL, end-to-end latency, token throughput and goodput.

The transport is loadgen's: callback-driven keep-alive connections, open loop (Poisson arrivals, times
fixed in advance by the seed, latency from the *scheduled* arrival so client-side queueing counts) or
closed loop. :class:`_StreamConn` adds what a stream needs to loadgen's connection: it decodes the
chunked body and splits it into SSE events, stamping each with its arrival time. Events are kept raw
and read only after the run (:func:`read_stream`), so the client spends its share of the CPU it shares
with the server on receiving, not on JSON.

Token counting: every request asks for ``stream_options.include_usage``, and the usage chunk's
``completion_tokens`` is the request's output-token count (exact: the server counts it). Per chunk,
the tokens are the length of the chunk's ``logprobs`` when the server sent them, otherwise 1 for
each chunk that carries a choice: rtserve sends one chunk per sampled token (the text of a chunk can
be empty, an incomplete UTF-8 character or a model without a tokenizer, so text is never counted).
TTFT is timed to the first chunk that carries a choice; ITL is every gap between such chunks.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import orjson

from .loadgen import TIMER_LOOKAHEAD_S, TIMER_SLACK_S, LoadResult, RequestSpec, _Conn, _Runner

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
WORDS = ("the of and to in is it for on that with as was at by this be from or an are have not but what all "
         "were when we there can more if no out so up said about into than them could time only new some "
         "model serve token batch queue cache").split()


@dataclass(frozen=True)
class OpenAIBenchConfig:
    """One run. Exactly one of ``rate`` (open loop) or ``concurrency`` (closed loop); the run ends
    after ``num_requests`` requests or, without it, when ``duration_s`` is over (no new requests)."""

    model: str
    chat: bool = False
    rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    input_len: tuple[int, int] = (32, 32)     # uniform in [min, max] (tokens; words for chat)
    output_len: tuple[int, int] = (128, 128)  # max_tokens, uniform in [min, max], EOS ignored
    prompts_file: str | None = None
    vocab_size: int = 256  # random prompt token ids are drawn below this: 256 fits any model
    temperature: float = 0.0
    seed: int = 0
    slos: dict[str, float] = field(default_factory=dict)  # SLO_KEYS -> bound in ms
    warmup_requests: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0 or self.concurrency is not None and self.concurrency < 1:
            raise ValueError("rate must be > 0 and concurrency >= 1")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s")
        if self.num_requests is not None and self.num_requests < 1 or self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("num_requests must be >= 1 and duration_s > 0")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: need 1 <= min <= max, got {lo}:{hi}")
        bad = sorted(set(self.slos) - set(SLO_KEYS))
        if bad:
            raise ValueError(f"slo: unknown key '{bad[0]}'; allowed: {', '.join(SLO_KEYS)}")
        if self.vocab_size < 1 or self.timeout_s <= 0 or self.warmup_requests < 0:
            raise ValueError("vocab_size >= 1, timeout_s > 0 and warmup_requests >= 0 are required")

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


# -- what to send ---------------------------------------------------------------------------------
def load_prompts(path: str) -> list[str | list[int]]:
    """A text file (one prompt per line) or JSONL whose objects have a ``prompt`` (text or token ids)."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if all(ln.lstrip().startswith("{") for ln in lines):
        prompts = []
        for i, ln in enumerate(lines, 1):
            p = json.loads(ln).get("prompt")
            if not p or not isinstance(p, (str, list)):
                raise ValueError(f"{path}:{i}: needs a non-empty 'prompt' (text or token ids)")
            prompts.append(p)
        return prompts
    return lines


@dataclass(frozen=True)
class PlannedRequest:
    spec: RequestSpec
    prompt_len: int  # tokens of a token-id prompt; 0 when the prompt is text (the usage chunk tells)
    max_tokens: int


class RequestPlanner:
    """Request i, drawn in index order from one seeded generator, so a run is reproducible."""

    def __init__(self, cfg: OpenAIBenchConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed + 1)
        self.prompts = load_prompts(cfg.prompts_file) if cfg.prompts_file else None
        self.headers = {"content-type": "application/json"}
        if cfg.api_key:
            self.headers["authorization"] = f"Bearer {cfg.api_key}"

    def plan(self, i: int) -> PlannedRequest:
        cfg, rng = self.cfg, self.rng
        max_tokens = rng.randint(*cfg.output_len)
        if self.prompts is not None:  # in file order, cycling
            prompt = self.prompts[i % len(self.prompts)]
        elif cfg.chat:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*cfg.input_len)))
        else:
            prompt = [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(*cfg.input_len))]
        body: dict = {"model": cfg.model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}, "temperature": cfg.temperature}
        if cfg.chat:
            if not isinstance(prompt, str):
                raise ValueError("chat needs text prompts, not token ids")
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        spec = RequestSpec("POST", cfg.path, orjson.dumps(body), self.headers)
        return PlannedRequest(spec, len(prompt) if isinstance(prompt, list) else 0, max_tokens)


# -- what came back -------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request. Times are ``perf_counter()`` seconds; ``t_start`` is the scheduled arrival (open
    loop) or the send (closed loop), so every latency includes time queued in the client."""

    index: int
    prompt_len: int
    max_tokens: int
    t_start: float
    t_end: float | None = None
    status: int = 0
    error: str | None = None  # None = success
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying a choice
    chunk_tokens: list[int] = field(default_factory=list)   # output tokens in that chunk
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_end is not None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.t_start

    @property
    def e2e(self) -> float:
        return self.t_end - self.t_start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with a single output token."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    def finish(self, t: float, status: int, events: list[tuple[float, bytes]], rest: bytes) -> None:
        """The answer is complete: read its stream (``rest`` = body bytes that were no event)."""
        self.t_end, self.status = t, status
        read_stream(self, events)
        if status != 200:
            self.error = f"HTTP {status}: {_error_message(rest or b''.join(e for _, e in events))}"

    def fail(self, t: float, kind: str) -> None:
        self.t_end, self.error = t, kind


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])[:200]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class SSEParser:
    """Server-sent events from a byte stream in arbitrary pieces: ``feed`` returns the ``data`` of
    every event completed by this piece (multi-line data joined with newlines)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data
        if b"\r" in buf:  # a CR left at the end pairs with the next piece's LF on the next feed
            buf = buf.replace(b"\r\n", b"\n")
        *events, self.buf = buf.split(b"\n\n")
        out = []
        for ev in events:
            lines = [ln[5:] for ln in ev.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(ln[1:] if ln.startswith(b" ") else ln for ln in lines))
        return out


def read_stream(rec: RequestRecord, events: list[tuple[float, bytes]]) -> None:
    """Fill ``rec`` from its (arrival time, data) events; a stream without ``[DONE]``, with an error
    event or with an aborted choice is an error."""
    done, usage = False, None
    for t, data in events:
        if data == b"[DONE]":
            done = True
            continue
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            rec.error = rec.error or f"bad event: {data[:80]!r}"
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("error"):
            err = doc["error"]
            rec.error = rec.error or f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
        for choice in doc.get("choices") or ():
            lp = choice.get("logprobs")
            n = len(lp.get("tokens") or lp.get("content") or ()) if isinstance(lp, dict) else 1
            rec.chunk_times.append(t)
            rec.chunk_tokens.append(n)
            rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
        usage = doc.get("usage") or usage
    rec.output_tokens = usage["completion_tokens"] if usage else sum(rec.chunk_tokens)
    rec.prompt_tokens = usage["prompt_tokens"] if usage else rec.prompt_len
    if rec.error is None and rec.status == 200:
        if rec.finish_reason == "abort":
            rec.error = "aborted by the server"
        elif not done:
            rec.error = "stream ended without [DONE]"
        elif not rec.chunk_times:
            rec.error = "no output"


# -- transport: loadgen's runner and connections, with streams ----------------------------------
class _StreamConn(_Conn):
    """loadgen's connection, keeping the body: chunked bodies are decoded into SSE events; the first
    bytes of any other body are kept for an error message."""

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


class _StreamRunner(_Runner):
    """Starts requests from a planner (each job carries its RequestRecord in loadgen's "counted"
    slot) and finishes the run after the last one, rather than at a fixed end time."""

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
