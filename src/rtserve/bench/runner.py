"""The load generator's connection pool and request bookkeeping, shared by the closed loop, the open
loop (``loadgen``) and the streaming OpenAI bench (``openai_load``, which subclasses it).

:class:`Runner` turns jobs into requests on :class:`~.http1.Connection` objects: a job takes an idle
kept-alive connection or waits in ``backlog`` for a new one (at most ``max_connections`` open or
opening). It counts what the connections report into a :class:`~.result.LoadResult`, but only for
jobs marked "counted" (those in the measured window) and only until ``shutdown`` sets ``stopped``.
In the closed loop a finished job starts the next one on the spot, until ``t_end``.

Connections the server closes (``Connection: close``, EOF or a reset) are replaced and counted in
``reconnects``; a request that finds its kept-alive connection closed before any byte of an answer
is resent once on a fresh connection (as HTTP clients do for that race) instead of counting as an
error. ``sweep`` times out requests in flight longer than ``timeout_s``.
"""
from __future__ import annotations

import asyncio
from collections import deque
from time import perf_counter

from .http1 import Connection, Job, RequestSource, RequestSpec
from .result import LoadResult


class Runner:
    """One run's connections and jobs; see the module docstring."""

    conn_class: type[Connection] = Connection  # the protocol of each connection (a subclass may parse bodies)

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
        self.conns: set[Connection] = set()
        self.idle: list[Connection] = []
        self.backlog: deque[Job] = deque()  # jobs waiting for a connection
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

    def submit(self, job: Job) -> None:
        idle = self.idle
        if idle:
            idle.pop().send(job)
        else:
            self.backlog.append(job)
            self.maybe_connect()

    def job_done(self, job: Job) -> None:
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

    def fail(self, job: Job, kind: str) -> None:
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

    def free(self, conn: Connection) -> None:
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def drop(self, conn: Connection, abort: bool = False) -> None:
        self.conns.discard(conn)
        if not conn.closed:
            conn.closed = True
            if abort:
                conn.transport.abort()
            else:
                conn.transport.close()

    # -- events from connections
    def on_answer(self, conn: Connection, job: Job, status: int, close: bool) -> None:
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

    def on_lost(self, conn: Connection, exc: BaseException | None) -> None:
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

    def on_bad(self, conn: Connection) -> None:
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
