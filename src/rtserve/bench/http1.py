"""The HTTP/1.1 client side of the load generator: a request's bytes, and a keep-alive connection
that carries one request at a time and parses the answer without tasks, futures or streams.

:class:`Connection` is a raw :class:`asyncio.Protocol` owned by a :class:`~.runner.Runner`. The
runner hands it a :data:`Job` with :meth:`Connection.send`; the answer is parsed in
``data_received`` (Content-Length, chunked, or until EOF; interim 1xx answers skipped) and
reported with a plain method call, ``runner.on_answer(conn, job, status, close)``. A lost
connection reports ``runner.on_lost``, an unparsable answer ``runner.on_bad``. Bodies are skipped,
not kept: a subclass that needs them (``openai_load``'s stream connection) overrides ``_chunks``.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from .runner import Runner


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


class BadResponse(Exception):
    """An answer that is not HTTP/1.x (or has a malformed head)."""


# A job is one request: (t0 for its latency, counted?, request bytes, already resent once?). "counted"
# is True/False here; a subclass of Runner may put a (truthy) per-request record there instead.
Job = tuple  # (float, bool | object, bytes, bool)


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight; reports to the runner."""

    __slots__ = ("r", "transport", "job", "t_sent", "served", "got", "closed", "head", "state",
                 "status", "close", "remaining", "cbuf", "cpos", "is_head")

    _HEAD, _LENGTH, _CHUNKED, _EOF = 0, 1, 2, 3

    def __init__(self, runner: Runner) -> None:
        self.r = runner
        self.transport: asyncio.Transport | None = None
        self.job: Job | None = None
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
        except (ValueError, IndexError, BadResponse):
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
                raise BadResponse
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
    def send(self, job: Job) -> None:
        self.job = job
        self.got = False
        self.is_head = job[2][:5] == b"HEAD "
        self.t_sent = perf_counter()
        self.transport.write(job[2])
