"""rtserve.bench.loadgen against tiny real HTTP/1.1 servers on loopback (ephemeral ports).

Each server counts what it really answered, and the tests check the load generator's numbers against
those counts: closed loop, Poisson open loop, chunked and fragmented answers, non-2xx statuses,
servers that close connections, silent servers, refused connections and client-side queueing.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from rtserve.bench.loadgen import LoadResult, RequestSpec, run_load, run_load_sync
from rtserve.bench.report import format_table, percentile, write_json

SPEC = RequestSpec("POST", "/v2/models/m/infer", b'{"inputs": []}', {"content-type": "application/json"})
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Server:
    """An asyncio HTTP/1.1 keep-alive server whose answers come from ``behaviour``.

    ``behaviour(n, head, writer)`` answers request number ``n`` (1-based, over all connections) and
    returns False to close the connection afterwards. The server counts requests and connections
    and records arrival times.
    """

    def __init__(self, behaviour=None) -> None:
        self.behaviour = behaviour or (lambda n, head, w: w.write(OK))
        self.requests = 0
        self.connections = 0
        self.arrivals: list[float] = []
        self.paths: list[str] = []

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next(int(ln.split(b":")[1]) for ln in lines if ln.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                self.arrivals.append(time.perf_counter())
                self.paths.append(lines[0].split()[1].decode())
                keep = await _maybe_await(self.behaviour(self.requests, head, writer))
                await writer.drain()
                if keep is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _maybe_await(x):
    return await x if asyncio.iscoroutine(x) else x


def chunked(n, head, w):
    # Chunks split over several writes, with an extension and a trailer.
    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n3;ext=1\r\nabc\r\n")
    w.write(b"a\r\n0123456789\r\n")
    w.write(b"0\r\nX-Trailer: yes\r\n\r\n")


def every_3rd_503(n, head, w):
    if n % 3 == 0:
        w.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nRetry-After: 1\r\n\r\nbusy")
    else:
        w.write(OK)


def close_after_each(n, head, w):
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    return False


def eof_after_each(n, head, w):
    # Closes the kept-alive connection without saying so: the client finds out on its next request.
    w.write(OK)
    return False


def run(behaviour=None, **kw) -> tuple[LoadResult, Server]:
    async def main():
        async with Server(behaviour) as srv:
            res = await run_load("127.0.0.1", srv.port, kw.pop("request", SPEC), **kw)
        return res, srv

    return asyncio.run(main())


def check_consistent(res: LoadResult) -> None:
    s = res.summary()
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert 0 < min(res.latencies_ms) and s["mean"] == pytest.approx(np.mean(res.latencies_ms))
    assert res.percentile(90) == pytest.approx(np.percentile(res.latencies_ms, 90))
    assert s["throughput"] == pytest.approx(res.num_ok / res.duration_s)
    non_2xx = sum(n for code, n in res.status_counts.items() if not 200 <= code < 300)
    assert len(res.error_latencies_ms) == non_2xx
    assert s["errors"] == non_2xx + sum(res.errors.values())
    assert res.num_requests == sum(res.status_counts.values()) + sum(res.errors.values()) + res.unanswered


# -- closed loop


@pytest.mark.parametrize("behaviour", [None, chunked], ids=["content-length", "chunked"])
def test_closed_loop_counts_match_the_server(behaviour):
    res, srv = run(behaviour, concurrency=4, duration_s=0.4)
    assert res.mode == "closed" and res.concurrency == 4 and res.rate is None
    assert res.num_ok == srv.requests > 100
    assert res.status_counts == {200: srv.requests}
    assert res.errors == {} and res.unanswered == 0 and res.reconnects == 0
    assert srv.connections == res.connections == 4  # one persistent connection per client
    assert 0.4 <= res.elapsed_s < 0.45  # the last answers came in just after the window
    check_consistent(res)


def test_closed_loop_statuses():
    res, srv = run(every_3rd_503, concurrency=4, duration_s=0.25)
    n = srv.requests
    assert res.status_counts == {200: n - n // 3, 503: n // 3}
    assert res.num_ok == n - n // 3 and len(res.error_latencies_ms) == n // 3
    assert res.summary()["errors"] == n // 3 and res.errors == {}
    check_consistent(res)


def test_reconnects_on_connection_close():
    res, srv = run(close_after_each, concurrency=4, duration_s=0.2)
    assert res.num_ok == srv.requests > 20 and res.errors == {}
    assert res.reconnects == srv.requests  # every answer closed its connection
    assert srv.connections == res.connections == srv.requests
    check_consistent(res)


def test_unannounced_close_resends_instead_of_failing():
    res, srv = run(eof_after_each, concurrency=2, duration_s=0.2)
    assert res.num_ok == srv.requests > 20
    assert res.errors == {} and res.unanswered == 0
    assert res.reconnects >= res.num_ok - 2  # each connection served one answer, then was replaced
    assert srv.connections == res.connections


def test_answers_in_pieces_and_eof_delimited_bodies():
    big = b"x" * 300_000

    async def pieces(w, *parts):
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.001)  # so that the client sees each piece on its own
            w.write(part)
            await w.drain()

    async def fragmented(n, head, w):
        if n % 3 == 1:  # head split mid-line, a large body in pieces
            await pieces(w, b"HTTP/1.1 200 OK\r\nContent-", b"Length: %d\r\n\r\n" % len(big) + big[:1000], big[1000:])
        elif n % 3 == 2:  # chunked, split inside a size line, inside the data and before the trailer
            await pieces(w, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1", b"0\r\n0123456789",
                         b"abcdef\r\n0\r\n", b"X-Trailer: 1\r\n\r\n")
        else:  # no length: the body ends with the connection
            w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno length, ends with the connection")
            return False

    res, srv = run(fragmented, concurrency=2, duration_s=0.2)
    assert res.num_ok == srv.requests > 10 and res.errors == {} and res.unanswered == 0
    assert res.status_counts == {200: srv.requests}


def test_warmup_is_not_counted():
    res, srv = run(every_3rd_503, concurrency=2, duration_s=0.2, warmup_s=0.1)
    assert 0 < res.num_requests < srv.requests  # the warm-up requests reached the server, uncounted
    assert res.status_counts[503] == pytest.approx(res.num_requests / 3, abs=2)
    # throughput is over the measured window only
    assert res.throughput == pytest.approx(res.num_ok / 0.2)


def test_request_factory_is_called_per_request():
    res, srv = run(concurrency=2, duration_s=0.1,
                   request=lambda i: RequestSpec("POST", f"/r/{i}", b"%d" % i, {}))
    assert res.num_ok == srv.requests
    assert sorted(srv.paths) == sorted(f"/r/{i}" for i in range(srv.requests))


# -- open loop


def test_open_loop_poisson_rate():
    res, srv = run(rate=200, duration_s=0.5, seed=1)
    assert res.mode == "open" and res.rate == 200 and res.concurrency is None
    assert 100 * 0.7 < res.num_ok < 100 * 1.3
    assert res.num_ok == srv.requests and res.status_counts == {200: srv.requests}
    assert res.errors == {} and res.unanswered == 0
    check_consistent(res)
    # Exponential gaps: the coefficient of variation is about 1 (0 for a fixed pace). The server sees
    # arrivals, which a loaded machine bunches (1.8 seen at a load of 12 on 2 cores): a loose upper bound.
    gaps = np.diff(srv.arrivals)
    assert 0.6 < gaps.std() / gaps.mean() < 2.5
    # The answer is quick and the connection goes back to the pool: a handful of connections suffice.
    assert res.connections <= 10


def test_open_loop_is_seeded():
    a, _ = run(rate=1000, duration_s=0.1, seed=7)
    b, _ = run(rate=1000, duration_s=0.1, seed=7)
    c, _ = run(rate=1000, duration_s=0.1, seed=8)
    assert a.num_requests == b.num_requests != c.num_requests


def test_open_loop_statuses_and_closes():
    res, srv = run(every_3rd_503, rate=400, duration_s=0.15, seed=2)
    n = srv.requests
    assert res.status_counts == {200: n - n // 3, 503: n // 3}
    res, srv = run(close_after_each, rate=400, duration_s=0.15, seed=2)
    assert res.num_ok == srv.requests == res.reconnects == srv.connections and res.errors == {}


def test_open_loop_counts_client_queueing():
    """A server that answers one request at a time in 10 ms gets 200/s offered (twice what it can do)
    over two connections at most: requests queue in the client, and that wait is part of the latency."""
    lock = asyncio.Lock()

    async def serial(n, head, w):
        async with lock:
            await asyncio.sleep(0.01)
            w.write(OK)

    res, srv = run(serial, rate=200, duration_s=0.2, seed=3, max_connections=2, drain_timeout_s=2)
    assert res.num_ok == srv.requests and res.unanswered == 0 and res.connections == 2
    assert max(res.latencies_ms) > 60  # ~40 offered in 0.2 s, ~20 served: the last ones waited long
    assert res.elapsed_s > 0.3  # answered during the drain: the served rate is num_ok / elapsed_s
    closed, _ = run(serial, concurrency=1, duration_s=0.1)
    assert closed.percentile(50) < 20  # one client alone sees just the service time


# -- failures


def test_silent_server_unanswered_and_timeouts():
    async def silent(n, head, w):
        await asyncio.sleep(5)

    res, srv = run(silent, rate=100, duration_s=0.1, drain_timeout_s=0.1, seed=4)
    assert res.num_ok == 0 and res.unanswered == srv.requests > 0 and res.errors == {}
    res, srv = run(silent, concurrency=2, duration_s=0.2, timeout_s=0.06, drain_timeout_s=0.1)
    assert res.num_ok == 0 and res.errors["timeout"] >= 2 and res.unanswered <= 2
    assert res.num_requests == res.errors["timeout"] + res.unanswered


def test_connection_refused_is_an_error():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await run_load("127.0.0.1", port, SPEC, rate=100, duration_s=0.1, seed=5)

    res = asyncio.run(main())
    assert res.num_ok == 0 and res.errors.get("ConnectionRefusedError", 0) == res.num_requests > 0


def test_garbage_answer_is_a_bad_response():
    res, srv = run(lambda n, head, w: w.write(b"SSH-2.0-OpenSSH\r\n\r\n"), concurrency=1, duration_s=0.1)
    assert res.num_ok == 0 and res.errors["bad_response"] == srv.requests > 0


# -- arguments, sync entry point, report helpers


def test_exactly_one_of_concurrency_and_rate():
    for kw in ({}, {"concurrency": 2, "rate": 3.0}, {"concurrency": 0}, {"rate": -1.0}):
        with pytest.raises(ValueError):
            asyncio.run(run_load("127.0.0.1", 1, SPEC, duration_s=1, **kw))
    with pytest.raises(ValueError):
        run_load_sync("127.0.0.1", 1, SPEC, duration_s=1)


def test_run_load_sync_against_a_server_on_another_thread():
    ready = threading.Event()
    box = {}

    def serve():
        async def main():
            async with Server() as srv:
                box["srv"], box["stop"] = srv, asyncio.Event()
                ready.set()
                await box["stop"].wait()

        loop = asyncio.new_event_loop()
        box["loop"] = loop
        loop.run_until_complete(main())
        loop.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        res = run_load_sync("127.0.0.1", box["srv"].port, SPEC, concurrency=8, duration_s=0.2)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(5)
    assert res.num_ok == box["srv"].requests > 50 and res.connections == 8


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        vals = rng.exponential(3.0, n).tolist()
        for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(vals, p) == pytest.approx(np.percentile(vals, p), rel=1e-12)
    assert percentile([1.0, 2.0], 50) == 1.5  # linear interpolation
    assert np.isnan(percentile([], 50))


def test_format_table_and_write_json(tmp_path):
    table = format_table([{"name": "a", "p50": 1.234, "ok": 10}, {"name": "bb", "p50": float("nan")}],
                         ["name", "p50", "ok"])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "p50", "ok"]
    assert lines[1].split() == ["a", "1.23", "10"] and lines[2].split() == ["bb", "-"]
    assert len({len(line) for line in lines}) == 1  # aligned
    res = LoadResult("closed", 1, None, 1.0, latencies_ms=[1.0, 2.0], status_counts={200: 2})
    write_json(tmp_path / "out" / "r.json", {"summary": res.summary(), "n": np.int64(3), "a": np.arange(2)})
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["n"] == 3 and data["a"] == [0, 1] and data["summary"]["ok"] == 2
    assert data["summary"]["status_counts"] == {"200": 2}
