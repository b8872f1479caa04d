"""HTTP responses as the ASGI app builds them: status, body bytes, header list."""
from __future__ import annotations

import orjson

from ..errors import RtserveError

JSON = [(b"content-type", b"application/json")]
_EMPTY: list = []


class ClientGone(Exception):
    pass


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes = b"", headers: list | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers if headers is not None else _EMPTY


def json_response(obj, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj), JSON)


def error_response(err: RtserveError) -> Response:
    headers = JSON + [(k.encode(), v.encode()) for k, v in err.headers.items()]
    return Response(err.status, orjson.dumps({"error": err.message}), headers)
