"""HTTP responses as the ASGI app builds them: status, body bytes, header list."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

import orjson

from ..errors import RtserveError

JSON = [(b"content-type", b"application/json")]
_EMPTY: list = []
T = TypeVar("T")


class ClientGone(Exception):
    pass


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes = b"", headers: list | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers if headers is not None else _EMPTY


def json_response(obj, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj), JSON)


def error_headers(err: RtserveError) -> list:
    """The JSON content type and the error's own headers (``Retry-After``, ``Allow``)."""
    return JSON + [(k.encode(), v.encode()) for k, v in err.headers.items()]


def error_response(err: RtserveError) -> Response:
    return Response(err.status, orjson.dumps({"error": err.message}), error_headers(err))


async def until_disconnect(receive, work: Awaitable[T]) -> T:
    """Await ``work`` while watching the connection: if the client disconnects first, the handler's
    task is cancelled inside ``work`` (a queued request leaves its queue, a generation is aborted)
    and ClientGone raised. No extra task: the disconnect callback cancels the running one."""
    task = asyncio.current_task()
    gone = False

    def on_receive(w: asyncio.Future) -> None:
        nonlocal gone
        if not w.cancelled():  # the body was read already: the only message left is http.disconnect
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_receive)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            raise ClientGone() from None
        raise
    finally:
        watcher.remove_done_callback(on_receive)
        watcher.cancel()
