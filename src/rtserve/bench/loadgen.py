"""A cheap HTTP/1.1 load generator: closed loop (N clients back to back) or open loop (Poisson
arrivals at R req/s, latency measured from the *scheduled* arrival, so client-side queueing counts
and there is no coordinated omission).

On a 2-core machine the generator shares the CPU with the server it measures, so it is built to cost
as little as possible per request: no tasks, futures or streams on the request path. Each keep-alive
connection is a raw :class:`asyncio.Protocol` carrying one request at a time; the request bytes are
built once; responses are parsed in ``data_received`` (Content-Length, chunked, or until EOF) and the
completion is a plain method call that records the result and, in the closed loop, sends the next
request on the same connection. Arrivals in the open loop are timer callbacks. Coroutines are only
used to open connections.

Connections the server closes (``Connection: close``, EOF or a reset) are replaced and counted in
``reconnects``; a request that finds its kept-alive connection closed before any byte of an answer
is resent once on a fresh connection (as HTTP clients do for that race) instead of counting as an
error.
"""
from __future__ import annotations

import asyncio
import random
import socket
from collections import deque
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable, Union

from .report import percentile

# The event loop fires timers with millisecond granularity (uvloop rounds delays to whole ms), so an
# open-loop arrival can be dispatched up to ~1 ms off its schedule without anything being overloaded.
# Up to TIMER_SLACK_S of lateness is forgiven (latency is timed from at most schedule + slack), and
# arrivals due within TIMER_LOOKAHEAD_S are sent early (timed from when they are sent).
TIMER_SLACK_S = 0.001
TIMER_LOOKAHEAD_S = 0.0005


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP request; ``encode`` adds Host and Content-Length."""

    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(self.body)}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in ("host", "content-length")]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


RequestSource = Union[RequestSpec, Callable[[int], RequestSpec]]


@dataclass
class LoadResult:
    """What one run measured. Only requests started (closed loop) or scheduled (open loop) in the
    measured window, after the warm-up, are counted."""

    mode: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    duration_s: float
    # (left out of repr: asyncio reprs a finished task's result, and these can hold millions)
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # 2xx answers only
    error_latencies_ms: list[float] = field(default_factory=list, repr=False)  # non-2xx answers
    status_counts: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # no answer: timeout, reset, refused, ...
    unanswered: int = 0  # still without an answer when the drain timeout ran out
    reconnects: int = 0  # kept-alive connections the server closed
    connections: int = 0  # connections opened in all (warm-up included)
    late_arrivals: int = 0  # open loop: arrivals the client sent later than TIMER_SLACK_S (CPU-starved)
    # From the start of the measured window to the last counted answer. Well above duration_s, the
    # answers trailed in during the drain: the server (or the client) fell behind the offered load, and
    # num_ok / elapsed_s, not throughput, is the rate it really served.
    elapsed_s: float = 0.0

    @property
    def num_ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def num_requests(self) -> int:
        return sum(self.status_counts.values()) + sum(self.errors.values()) + self.unanswered

    @property
    def throughput(self) -> float:
        """Successful (2xx) answers per second of the measured window."""
        return self.num_ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    def summary(self) -> dict:
        non_2xx = sum(n for s, n in self.status_counts.items() if not 200 <= s < 300)
        lat = self.latencies_ms
        return {
            "throughput": self.throughput, "p50": self.percentile(50), "p90": self.percentile(90),
            "p99": self.percentile(99), "max": max(lat) if lat else float("nan"),
            "mean": sum(lat) / len(lat) if lat else float("nan"), "ok": self.num_ok,
            "errors": non_2xx + sum(self.errors.values()), "status_counts": dict(sorted(self.status_counts.items())),
            "unanswered": self.unanswered, "reconnects": self.reconnects, "elapsed_s": self.elapsed_s,
        }


class _BadResponse(Exception):
    pass


# A job is one request: (t0 for its latency, counted?, request bytes, already resent once?). "counted"
# is True/False here; a subclass of _Runner may put a (truthy) per-request record there instead.
_Job = tuple  # (float, bool | object, bytes, bool)


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight; reports to the runner."""

    __slots__ = ("r", "transport", "job", "t_sent", "served", "got", "closed", "head", "state",
                 "status", "close", "remaining", "cbuf", "cpos", "is_head")

    _HEAD, _LENGTH, _CHUNKED, _EOF = 0, 1, 2, 3

    def __init__(self, runner: _Runner) -> None:
        self.r = runner
        self.transport: asyncio.Transport | None = None
        self.job: _Job | None = None
        self.t_sent = 0.0
        self.served = 0  # answers received on this connection
        self.got = False  # any byte of the current answer received
        self.closed = False
        self.head = b""  # response head received so far (bytes or bytearray)
        self.state = self._HEAD
        self.status = 0
        self.close = False
        self.remaining = 0
        self.cbuf = bytearray()
        self.cpos = 0
        self.is_head = False

    # -- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        job = self.job
        if job is not None and self.state == self._EOF and exc is None:
            self._complete()  # body delimited by the end of the connection
            return
        self.r.on_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        if self.job is None:
            return  # nothing asked: stray bytes after an answer, ignored
        self.got = True
        state = self.state
        if state == self._LENGTH:  # fast path for a body arriving in pieces
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._complete()
            return
        if state == self._CHUNKED:
            self.cbuf += data
            if self._chunks():
                self._complete()
            return
        if state == self._EOF:
            return
        try:
            done = self._parse_head(data)
        except (ValueError, IndexError, _BadResponse):
            self.r.on_bad(self)
            return
        if done:
            self._complete()

    # -- parsing
    def _parse_head(self, data: bytes) -> bool:
        """Parse the head of the answer; True when the whole answer is in."""
        buf = self.head + data if self.head else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.head = bytearray(buf) if not isinstance(buf, bytearray) else buf
                return False
            self.head = b""
            h = buf[:end].lower()
            if h[:7] != b"http/1.":
                raise _BadResponse
            status = int(h[9:12])
            if 100 <= status < 200 and status != 101:  # interim answer (100 Continue): skip it
                buf = buf[end + 4:]
                continue
            break
        self.status = status
        close = h[7:8] == b"0" and b"keep-alive" not in h  # HTTP/1.0 closes unless told otherwise
        i = h.find(b"\r\nconnection:")
        if i >= 0:
            j = h.find(b"\r\n", i + 13)
            close = b"close" in h[i + 13:j if j >= 0 else end]
        start = end + 4
        self.close = close
        if self.is_head or status in (204, 304) or status < 200:
            return True
        i = h.find(b"\r\ntransfer-encoding:")
        if i >= 0:
            j = h.find(b"\r\n", i + 20)
            if b"chunked" in h[i + 20:j if j >= 0 else end]:
                self.state = self._CHUNKED
                self.cbuf = bytearray(buf[start:])
                self.cpos = 0
                return self._chunks()
        i = h.find(b"\r\ncontent-length:")
        if i >= 0:
            j = h.find(b"\r\n", i + 17)
            self.remaining = int(h[i + 17:j if j >= 0 else end]) - (len(buf) - start)
            if self.remaining <= 0:
                return True
            self.state = self._LENGTH
            return False
        self.close = True  # no length: the body runs to the end of the connection
        self.state = self._EOF
        return False

    def _chunks(self) -> bool:
        """Walk the chunks received so far; True at the end of the last one (and its trailers)."""
        buf, pos = self.cbuf, self.cpos
        try:
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].partition(b";")[0], 16)
                if size == 0:
                    if buf.find(b"\r\n\r\n", eol) >= 0:  # end of the (possibly empty) trailers
                        self.cbuf = bytearray()
                        return True
                    break
                pos = eol + 2 + size + 2
        except ValueError:
            self.r.on_bad(self)
            return False
        if pos > 65536 and pos <= len(buf):  # keep the buffer small for long streamed answers
            del buf[:pos]
            pos = 0
        self.cpos = pos
        return False

    def _complete(self) -> None:
        job = self.job
        self.job = None
        self.served += 1
        self.state = self._HEAD
        self.r.on_answer(self, job, self.status, self.close)

    # -- runner side
    def send(self, job: _Job) -> None:
        self.job = job
        self.got = False
        self.is_head = job[2][:5] == b"HEAD "
        self.t_sent = perf_counter()
        self.transport.write(job[2])


class _Runner:
    conn_class: type[_Conn] = _Conn  # the protocol of each connection (a subclass may parse bodies)

    def __init__(self, addr: str, host: str, port: int, request: RequestSource, res: LoadResult, *,
                 closed_loop: bool, t_measure: float, t_end: float, timeout_s: float, max_connections: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.addr, self.port, self.res = addr, port, res  # connect to addr, name host in the Host header
        self.hostport = f"{host}:{port}"
        self.fixed = request.encode(self.hostport) if isinstance(request, RequestSpec) else None
        self.make = None if isinstance(request, RequestSpec) else request
        self.index = 0
        self.closed_loop = closed_loop
        self.t_measure, self.t_end = t_measure, t_end
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.conns: set[_Conn] = set()
        self.idle: list[_Conn] = []
        self.backlog: deque[_Job] = deque()  # jobs waiting for a connection
        self.connecting = 0
        self.connect_tasks: set[asyncio.Task] = set()
        self.inflight = 0  # jobs not finished, warm-up included
        self.counted_inflight = 0  # ... of which in the measured window
        self.ending = False  # no new jobs
        self.stopped = False  # results are final; late events are ignored
        self.drained: asyncio.Future | None = None
        self.sweep_handle: asyncio.TimerHandle | None = None
        self.last_answer = t_measure

    # -- jobs
    def new_job(self, t0: float, record: bool) -> None:
        if self.fixed is not None:
            data = self.fixed
        else:
            data = self.make(self.index).encode(self.hostport)
            self.index += 1
        self.inflight += 1
        if record:
            self.counted_inflight += 1
        self.submit((t0, record, data, False))

    def submit(self, job: _Job) -> None:
        idle = self.idle
        if idle:
            idle.pop().send(job)
        else:
            self.backlog.append(job)
            self.maybe_connect()

    def job_done(self, job: _Job) -> None:
        self.inflight -= 1
        if job[1]:
            self.counted_inflight -= 1
        if self.closed_loop and not self.ending:
            now = perf_counter()
            if now < self.t_end:
                self.new_job(now, now >= self.t_measure)
                return
        if self.ending and self.inflight == 0 and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def fail(self, job: _Job, kind: str) -> None:
        if job[1] and not self.stopped:
            errors = self.res.errors
            errors[kind] = errors.get(kind, 0) + 1
        self.job_done(job)

    # -- connections
    def maybe_connect(self) -> None:
        while self.connecting < len(self.backlog) and len(self.conns) + self.connecting < self.max_connections:
            self.connecting += 1
            task = self.loop.create_task(self.connect())
            self.connect_tasks.add(task)
            task.add_done_callback(self.connect_tasks.discard)

    async def connect(self) -> None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: self.conn_class(self), self.addr, self.port), self.timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            self.connecting -= 1
            if not self.stopped and self.backlog:
                self.fail(self.backlog.popleft(), "connect_timeout" if isinstance(e, asyncio.TimeoutError)
                          else type(e).__name__)
                self.maybe_connect()
            return
        self.connecting -= 1
        self.res.connections += 1
        if self.stopped:
            conn.transport.close()
            return
        if not conn.closed:
            self.conns.add(conn)
            self.free(conn)
        else:
            self.maybe_connect()

    def free(self, conn: _Conn) -> None:
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def drop(self, conn: _Conn, abort: bool = False) -> None:
        self.conns.discard(conn)
        if not conn.closed:
            conn.closed = True
            if abort:
                conn.transport.abort()
            else:
                conn.transport.close()

    # -- events from connections
    def on_answer(self, conn: _Conn, job: _Job, status: int, close: bool) -> None:
        now = perf_counter()
        if job[1] and not self.stopped:
            self.last_answer = now
            res = self.res
            sc = res.status_counts
            sc[status] = sc.get(status, 0) + 1
            (res.latencies_ms if 200 <= status < 300 else res.error_latencies_ms).append((now - job[0]) * 1000.0)
        if close or conn.closed:
            if not self.stopped:
                self.res.reconnects += 1
            self.drop(conn)
            self.job_done(job)
            if self.backlog:
                self.maybe_connect()
        else:
            self.free(conn)
            self.job_done(job)

    def on_lost(self, conn: _Conn, exc: BaseException | None) -> None:
        if self.stopped or conn not in self.conns:
            return  # closed by us
        self.conns.discard(conn)
        job = conn.job
        conn.job = None
        if job is None:  # an idle kept-alive connection closed by the server
            if conn in self.idle:
                self.idle.remove(conn)
            self.res.reconnects += 1
            return
        if conn.served and not conn.got and not job[3]:
            # The server closed a kept-alive connection as the request went out: resend it once.
            self.res.reconnects += 1
            self.backlog.appendleft((job[0], job[1], job[2], True))
            self.maybe_connect()
            return
        self.fail(job, type(exc).__name__ if exc is not None else "connection_closed")
        if self.backlog:
            self.maybe_connect()

    def on_bad(self, conn: _Conn) -> None:
        job = conn.job
        conn.job = None
        self.drop(conn, abort=True)
        if job is not None:
            self.fail(job, "bad_response")
        if self.backlog:
            self.maybe_connect()

    def sweep(self) -> None:
        """Time out requests in flight longer than timeout_s (checked a few times a second)."""
        if self.stopped:
            return
        now = perf_counter()
        late = [c for c in self.conns if c.job is not None and now - c.t_sent > self.timeout_s]
        for conn in late:
            job = conn.job
            conn.job = None
            self.drop(conn, abort=True)
            self.fail(job, "timeout")
        if late and self.backlog:
            self.maybe_connect()
        self.sweep_handle = self.loop.call_later(min(self.timeout_s / 4, 0.25), self.sweep)

    async def shutdown(self) -> None:
        self.stopped = True
        if self.sweep_handle is not None:
            self.sweep_handle.cancel()
        for task in list(self.connect_tasks):
            task.cancel()
        if self.connect_tasks:
            await asyncio.gather(*self.connect_tasks, return_exceptions=True)
        for conn in list(self.conns):
            busy = conn.job is not None
            conn.job = None
            self.drop(conn, abort=busy)
        self.idle.clear()
        self.backlog.clear()
        await asyncio.sleep(0)  # let connection_lost run


class _Arrivals:
    """Poisson arrivals as timer callbacks: each tick sends what is due and sleeps until the next."""

    def __init__(self, runner: _Runner, rate: float, t_start: float, seed: int) -> None:
        self.r = runner
        self.rng = random.Random(seed)
        self.rate = rate
        self.t_next = t_start + self.rng.expovariate(rate)
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def tick(self, final: bool = False) -> None:
        r = self.r
        now = perf_counter()
        t, t_end, t_measure = self.t_next, r.t_end, r.t_measure
        due = t_end if final else now + TIMER_LOOKAHEAD_S
        expovariate, rate = self.rng.expovariate, self.rate
        while t <= due and t < t_end:
            if now - t > TIMER_SLACK_S:
                r.res.late_arrivals += t >= t_measure
            # Timed from the schedule, less up to TIMER_SLACK_S of timer lateness; if sent early, from now.
            r.new_job(min(now, t + TIMER_SLACK_S), t >= t_measure)
            t += expovariate(rate)
        self.t_next = t
        if t < t_end and not final:
            self.handle = r.loop.call_later(t - perf_counter(), self.tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.tick(final=True)  # anything scheduled before the end that a late timer has not sent yet


async def run_load(host: str, port: int, request: RequestSource, *, concurrency: int | None = None,
                   rate: float | None = None, duration_s: float, warmup_s: float = 0.0, seed: int = 0,
                   timeout_s: float = 30.0, max_connections: int = 1024, drain_timeout_s: float = 10.0) -> LoadResult:
    """Drive ``request`` at ``host:port`` for ``warmup_s + duration_s`` and measure the answers.

    Closed loop (``concurrency=N``): N clients, each with its own keep-alive connection, send back to
    back; latency is from send (or reconnect) to the end of the answer. Open loop (``rate=R``):
    arrivals at R/s with exponential gaps from ``random.Random(seed)``; each takes a free connection
    from a pool, or queues for a new one (at most ``max_connections`` open); latency is from the
    scheduled arrival. ``request`` is one :class:`RequestSpec` (encoded once) or a function of the
    request index. After the run, requests in flight get ``drain_timeout_s`` to finish; those that do
    not are ``unanswered``. A single request gets ``timeout_s`` before it counts as a ``timeout`` error.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if concurrency is not None and concurrency < 1 or rate is not None and not rate > 0:
        raise ValueError("concurrency must be >= 1 and rate > 0")
    if duration_s <= 0 or warmup_s < 0 or timeout_s <= 0 or drain_timeout_s < 0 or max_connections < 1:
        raise ValueError("duration_s and timeout_s must be > 0, warmup_s and drain_timeout_s >= 0, "
                         "max_connections >= 1")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # resolve once, not per connection
    addr = infos[0][4][0]
    res = LoadResult("closed" if concurrency else "open", concurrency, rate, duration_s)
    t0 = perf_counter()
    r = _Runner(addr, host, port, request, res, closed_loop=concurrency is not None, t_measure=t0 + warmup_s,
                t_end=t0 + warmup_s + duration_s, timeout_s=timeout_s,
                max_connections=concurrency if concurrency else max_connections)
    r.sweep()
    arrivals = None
    try:
        if concurrency:
            for _ in range(concurrency):
                r.new_job(t0, warmup_s == 0)
        else:
            arrivals = _Arrivals(r, rate, t0, seed)
            arrivals.tick()
        while (left := r.t_end - perf_counter()) > 0:
            await asyncio.sleep(left)
        if arrivals is not None:
            arrivals.stop()
        r.ending = True
        if r.inflight:
            r.drained = loop.create_future()
            await asyncio.wait([r.drained], timeout=drain_timeout_s)
        res.unanswered = r.counted_inflight
        res.elapsed_s = r.last_answer - r.t_measure
    finally:
        if arrivals is not None and arrivals.handle is not None:
            arrivals.handle.cancel()
        await r.shutdown()
    return res


def run_load_sync(host: str, port: int, request: RequestSource, *, concurrency: int | None = None,
                  rate: float | None = None, duration_s: float, warmup_s: float = 0.0, seed: int = 0,
                  timeout_s: float = 30.0, max_connections: int = 1024, drain_timeout_s: float = 10.0) -> LoadResult:
    """:func:`run_load` in a fresh event loop (uvloop when it is installed)."""
    coro = run_load(host, port, request, concurrency=concurrency, rate=rate, duration_s=duration_s,
                    warmup_s=warmup_s, seed=seed, timeout_s=timeout_s, max_connections=max_connections,
                    drain_timeout_s=drain_timeout_s)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
