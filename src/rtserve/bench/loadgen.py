"""A cheap HTTP/1.1 load generator: closed loop (N clients back to back) or open loop (Poisson
arrivals at R req/s, latency measured from the *scheduled* arrival, so client-side queueing counts
and there is no coordinated omission).

Each connection is a raw asyncio Protocol with one request in flight: the request bytes are built
once, the response parser handles Content-Length and chunked bodies, and a closed connection is
reopened and counted. On a 2-core machine the generator shares the CPU with the server, so it is
kept to a few tens of microseconds per request.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .report import percentile

TIMER_SLACK_S = 0.002


@dataclass(frozen=True)
class RequestSpec:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(self.body)}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in ("host", "content-length")]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass
class LoadResult:
    mode: str
    concurrency: int | None
    rate: float | None
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    error_latencies_ms: list[float] = field(default_factory=list)
    status_counts: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    reconnects: int = 0

    @property
    def num_ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def num_requests(self) -> int:
        return sum(self.status_counts.values()) + sum(self.errors.values()) + self.unanswered

    @property
    def throughput(self) -> float:
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
            "unanswered": self.unanswered, "reconnects": self.reconnects,
        }


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; resolves ``waiter`` with (status, close)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self._head: tuple[int, int, bool, bool] | None = None  # status, body start, chunked, close
        self._length = -1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed by the server"))

    def send(self, data: bytes, loop) -> asyncio.Future:
        self.waiter = loop.create_future()
        self.buf.clear()
        self._head, self._length = None, -1
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        if self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            chunked, close, length = False, False, 0
            for line in head[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "transfer-encoding" and "chunked" in v.lower():
                    chunked = True
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            self._head = (status, end + 4, chunked, close)
            self._length = length
        status, start, chunked, close = self._head
        if chunked:
            if not self._chunked_done(start):
                return
        elif len(self.buf) - start < self._length:
            return
        self.waiter.set_result((status, close))

    def _chunked_done(self, pos: int) -> bool:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return False
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                return buf.find(b"\r\n", eol + 2) >= 0
            pos = eol + 2 + size + 2
            if pos > len(buf):
                return False


class _Runner:
    def __init__(self, host, port, request, timeout_s, result: LoadResult) -> None:
        self.host, self.port, self.timeout_s, self.res = host, port, timeout_s, result
        self.request = request
        self._cache: dict[int, bytes] = {}
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Conn] = []
        self.num_conns = 0
        self.count = 0

    def payload(self) -> bytes:
        i = self.count
        self.count += 1
        if isinstance(self.request, RequestSpec):
            data = self._cache.get(0)
            if data is None:
                data = self._cache[0] = self.request.encode(f"{self.host}:{self.port}")
            return data
        return self.request(i).encode(f"{self.host}:{self.port}")

    async def connect(self) -> _Conn:
        _, conn = await self.loop.create_connection(_Conn, self.host, self.port)
        self.num_conns += 1
        return conn

    async def one(self, conn: _Conn | None, t_start: float, record: bool) -> _Conn | None:
        """Send one request (reconnecting once if the kept-alive connection went away)."""
        res = self.res
        try:
            if conn is None or conn.closed:
                if conn is not None:
                    res.reconnects += 1
                conn = await self.connect()
            status, close = await asyncio.wait_for(conn.send(self.payload(), self.loop), self.timeout_s)
        except asyncio.TimeoutError:
            if record:
                res.errors["timeout"] = res.errors.get("timeout", 0) + 1
            if conn is not None:
                conn.transport.close()
            return None
        except (ConnectionError, OSError) as e:
            if record:
                kind = type(e).__name__
                res.errors[kind] = res.errors.get(kind, 0) + 1
            return None
        ms = (time.perf_counter() - t_start) * 1000
        if record:
            res.status_counts[status] = res.status_counts.get(status, 0) + 1
            (res.latencies_ms if 200 <= status < 300 else res.error_latencies_ms).append(ms)
        if close:
            conn.transport.close()
            res.reconnects += 1
            return None
        return conn


async def run_load(host: str, port: int, request: RequestSpec | Callable[[int], RequestSpec], *,
                   concurrency: int | None = None, rate: float | None = None, duration_s: float,
                   warmup_s: float = 0.0, seed: int = 0, timeout_s: float = 30.0, max_connections: int = 1024,
                   drain_timeout_s: float = 10.0) -> LoadResult:
    """Drive ``request`` at the server for ``warmup_s + duration_s``; only the measured window counts."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if concurrency is not None and concurrency < 1 or rate is not None and rate <= 0:
        raise ValueError("concurrency must be >= 1 and rate > 0")
    res = LoadResult("closed" if concurrency else "open", concurrency, rate, duration_s)
    r = _Runner(host, port, request, timeout_s, res)
    t0 = time.perf_counter()
    t_measure, t_end = t0 + warmup_s, t0 + warmup_s + duration_s

    if concurrency:
        async def client() -> None:
            conn = None
            while True:
                start = time.perf_counter()
                if start >= t_end:
                    break
                conn = await r.one(conn, start, start >= t_measure)
            if conn is not None:
                conn.transport.close()

        tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=duration_s + warmup_s + drain_timeout_s + timeout_s)
        for t in pending:
            t.cancel()
        res.unanswered += len(pending)
        return res

    rng = random.Random(seed)
    inflight: set[asyncio.Task] = set()

    async def arrival(scheduled: float, record: bool) -> None:
        # Event-loop timers fire up to ~1 ms late (millisecond poll timeouts): lateness below
        # TIMER_SLACK_S is timer jitter, not load, so such a request is timed from when it is sent;
        # a request the client could not send for longer (backlog) is timed from its schedule.
        now = time.perf_counter()
        if now - scheduled < TIMER_SLACK_S:
            scheduled = now
        conn = r.idle.pop() if r.idle else None
        if conn is None and r.num_conns >= max_connections:
            res.errors["client_connection_cap"] = res.errors.get("client_connection_cap", 0) + 1
            return
        conn = await r.one(conn, scheduled, record)
        if conn is not None:
            r.idle.append(conn)
        else:
            r.num_conns -= 1

    t_next = t0
    while True:
        t_next += rng.expovariate(rate)
        if t_next >= t_end:
            break
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(arrival(t_next, t_next >= t_measure))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=drain_timeout_s)
        for t in pending:
            t.cancel()
        res.unanswered += len(pending)
    for conn in r.idle:
        conn.transport.close()
    return res


def run_load_sync(host: str, port: int, request, **kw) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(run_load(host, port, request, **kw))
    except ImportError:
        return asyncio.run(run_load(host, port, request, **kw))
