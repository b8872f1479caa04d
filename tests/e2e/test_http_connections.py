"""Connection handling of the REAL server (uvicorn + httptools) on loopback, with raw sockets:
idle keep-alive connections are closed after ``--timeout-keep-alive``, a request whose headers do not
arrive within ``--timeout-header`` gets a 408 and the connection is closed, a 413 closes the
connection, and ``--limit-concurrency`` answers 503. The repository is empty: none of this needs a model."""
from __future__ import annotations

import http.client
import select
import socket
import time

import httpx
import pytest

from servers import start_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def empty_repo(tmp_path_factory):
    return tmp_path_factory.mktemp("empty-repo")


@pytest.fixture(scope="module")
def short(empty_repo, tmp_path_factory):
    """Keep-alive 1 s, headers 1.5 s, bodies up to 1024 bytes."""
    with start_server(empty_repo, tmp_path_factory.mktemp("logs"), "--timeout-keep-alive", "1",
                      "--timeout-header", "1.5", "--max-body-bytes", "1024") as srv:
        yield srv
        assert "Traceback" not in srv.log_text()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _response(sock: socket.socket) -> tuple[int, dict, bytes]:
    r = http.client.HTTPResponse(sock, method="GET")
    r.begin()
    body = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def _seconds_until_closed(sock: socket.socket, limit: float = 10.0) -> float:
    """Block until the server closes the connection (EOF or reset); the seconds it took."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


GET_LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(short):
    with _connect(short.port) as s:
        for _ in range(2):  # a kept-alive connection serves a second request
            s.sendall(GET_LIVE)
            status, headers, _ = _response(s)
            assert status == 200 and headers.get("connection") != "close"
        waited = _seconds_until_closed(s)
    assert 0.7 < waited < 4, waited


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closed(short):
    with _connect(short.port) as s:  # slowloris: part of the headers, then nothing
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        t0 = time.monotonic()
        status, headers, body = _response(s)
        assert status == 408 and headers["connection"] == "close" and b"1.5 s" in body
        assert _seconds_until_closed(s) < 2
    assert 1.0 < time.monotonic() - t0 < 5
    with _connect(short.port) as s:  # a connection that never sends anything is closed too, silently
        waited = _seconds_until_closed(s)
        assert 1.0 < waited < 5, waited
    with _connect(short.port) as s:  # a byte at a time does not reset the deadline
        t0 = time.monotonic()
        for c in b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n":
            if select.select([s], [], [], 0.1)[0]:  # the server has answered: stop sending
                break
            s.sendall(bytes([c]))
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < 5
    assert httpx.get(short.url + "/v2/health/live", timeout=5).status_code == 200


def test_413_then_the_server_closes_the_connection(short):
    with _connect(short.port) as s:
        s.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b" " * 100)
        status, headers, body = _response(s)
        assert status == 413 and headers["connection"] == "close" and b"1024" in body
        assert _seconds_until_closed(s) < 1  # at once, not after the keep-alive timeout
    with _connect(short.port) as s:  # a body within the limit keeps the connection open
        s.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        status, headers, _ = _response(s)
        assert status == 200 and headers.get("connection") != "close"
        s.sendall(GET_LIVE)
        assert _response(s)[0] == 200


def test_limit_concurrency_answers_503(empty_repo, tmp_path_factory):
    with start_server(empty_repo, tmp_path_factory.mktemp("logs"), "--limit-concurrency", "2") as srv:
        idle = _connect(srv.port)
        time.sleep(0.2)  # the server has accepted it: one open connection
        with _connect(srv.port) as s:  # the second: two connections, the limit
            s.sendall(GET_LIVE)
            status, headers, _ = _response(s)
            assert status == 503 and headers["connection"] == "close"
        idle.close()
        deadline = time.monotonic() + 5
        while True:  # once the idle connection is gone, requests are served again
            with _connect(srv.port) as s:
                s.sendall(GET_LIVE)
                if _response(s)[0] == 200:
                    break
            assert time.monotonic() < deadline, "still refused after the idle connection closed"
            time.sleep(0.1)
