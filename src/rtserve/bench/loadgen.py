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

Connections the server closes are replaced and counted in ``reconnects``; a request that finds its
kept-alive connection closed before any byte of an answer is resent once (see ``runner.py``).

The parts: ``http1.py`` (:class:`RequestSpec` and the connection protocol), ``runner.py`` (the
connection pool and job bookkeeping), ``result.py`` (:class:`LoadResult`). This module drives them
(:func:`run_load`, the open loop's Poisson arrivals) and is where callers import them from.
"""
from __future__ import annotations

import asyncio
import random
import socket
from time import perf_counter

from .http1 import RequestSource, RequestSpec
from .result import LoadResult
from .runner import Runner

__all__ = ["TIMER_LOOKAHEAD_S", "TIMER_SLACK_S", "LoadResult", "RequestSource", "RequestSpec", "run_load",
           "run_load_sync"]

# The event loop fires timers with millisecond granularity (uvloop rounds delays to whole ms), so an
# open-loop arrival can be dispatched up to ~1 ms off its schedule without anything being overloaded.
# Up to TIMER_SLACK_S of lateness is forgiven (latency is timed from at most schedule + slack), and
# arrivals due within TIMER_LOOKAHEAD_S are sent early (timed from when they are sent).
TIMER_SLACK_S = 0.001
TIMER_LOOKAHEAD_S = 0.0005


class _Arrivals:
    """Poisson arrivals as timer callbacks: each tick sends what is due and sleeps until the next."""

    def __init__(self, runner: Runner, rate: float, t_start: float, seed: int) -> None:
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
    r = Runner(addr, host, port, request, res, closed_loop=concurrency is not None, t_measure=t0 + warmup_s,
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
