"""uvicorn's httptools protocol with a deadline on each request's line and headers.

uvicorn closes a connection left idle between requests (``timeout_keep_alive``), but it has no
setting that bounds how long a request's headers may take: a client that opens a connection and
sends nothing, or sends its headers a byte at a time (slowloris), holds the connection for ever.
``HeaderTimeoutProtocol`` arms a timer when a connection opens and when bytes arrive while no
request is in progress, and disarms it once a request's headers are complete. When it fires the
connection is closed, after a 408 if part of a request had arrived. The request body is not
covered (a body that trickles in is bounded only by ``max_body_bytes``).
"""
from __future__ import annotations

import asyncio
import functools

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the header deadline; uvicorn builds one per connection."""

    def __init__(self, *args, timeout_header: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_header = timeout_header
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False  # bytes came since the timer was armed: a request is under way

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the start of the next request (bytes during a request are its body)
        if self._header_timer is not None:
            self._partial = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._partial = False
        self._header_timer = self.loop.call_later(self.timeout_header, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._partial:
            body = orjson.dumps({"error": f"the request's headers did not arrive within {self.timeout_header:g} s"})
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def protocol_factory(timeout_header: float):
    """What ``uvicorn.Config(http=...)`` takes: builds a HeaderTimeoutProtocol per connection."""
    return functools.partial(HeaderTimeoutProtocol, timeout_header=timeout_header)
