"""The load generator against tiny real HTTP servers on loopback."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rtserve.bench.loadgen import RequestSpec, run_load
from rtserve.bench.report import format_table, percentile

SPEC = RequestSpec("POST", "/x", b'{"a": 1}', {"content-type": "application/json"})


async def _serve(behaviour: str):
    """A keep-alive HTTP server; returns (server, port, counter dict)."""
    count = {"requests": 0, "connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
                await reader.readexactly(length)
                count["requests"] += 1
                n = count["requests"]
                if behaviour == "chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                elif behaviour == "every3rd503" and n % 3 == 0:
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nRetry-After: 1\r\n\r\nbusy")
                elif behaviour == "close":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    await writer.drain()
                    writer.close()
                    return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], count


def _run(behaviour: str, **kw):
    async def main():
        server, port, count = await _serve(behaviour)
        async with server:
            res = await run_load("127.0.0.1", port, SPEC, **kw)
        return res, count

    return asyncio.run(main())


@pytest.mark.parametrize("behaviour", ["plain", "chunked"])
def test_closed_loop_counts_match_the_server(behaviour):
    res, count = _run(behaviour, concurrency=4, duration_s=0.4)
    assert res.num_ok == count["requests"] > 50
    assert res.status_counts == {200: count["requests"]} and res.unanswered == 0
    assert count["connections"] == 4
    s = res.summary()
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["throughput"] == pytest.approx(res.num_ok / 0.4)


def test_statuses_and_warmup_window():
    res, count = _run("every3rd503", concurrency=2, duration_s=0.3, warmup_s=0.1)
    assert 0 < res.num_requests < count["requests"]  # warm-up requests are not counted
    assert res.status_counts[503] == pytest.approx(res.num_requests / 3, abs=2)
    assert len(res.error_latencies_ms) == res.status_counts[503]
    assert res.summary()["errors"] == res.status_counts[503]


def test_reconnects_when_the_server_closes():
    res, count = _run("close", concurrency=2, duration_s=0.3)
    assert res.num_ok == count["requests"] and res.reconnects >= res.num_ok - 2
    assert count["connections"] >= res.num_ok


def test_open_loop_poisson_rate():
    res, count = _run("plain", rate=300, duration_s=1.0, seed=3)
    assert 300 * 0.7 < res.num_ok < 300 * 1.3
    assert res.num_ok == count["requests"] and res.unanswered == 0


def test_unanswered_requests_are_counted():
    async def main():
        async def silent(reader, writer):
            await asyncio.sleep(5)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run_load("127.0.0.1", port, SPEC, rate=50, duration_s=0.2, drain_timeout_s=0.2)

    res = asyncio.run(main())
    assert res.num_ok == 0 and res.unanswered > 0


def test_arguments_and_helpers():
    with pytest.raises(ValueError):
        asyncio.run(run_load("127.0.0.1", 1, SPEC, duration_s=1))
    with pytest.raises(ValueError):
        asyncio.run(run_load("127.0.0.1", 1, SPEC, concurrency=2, rate=3, duration_s=1))
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(vals, 50) == np.percentile(vals, 50) and percentile(vals, 99) == np.percentile(vals, 99)
    table = format_table([{"a": 1.5, "b": "x"}], ["a", "b"])
    assert table.splitlines()[1].split() == ["1.50", "x"]
