"""API-key check for model management (and optionally inference).

The key is read from ``RTSERVE_API_KEY`` (ServerConfig.api_key). Clients send it as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""
from __future__ import annotations

import hmac

from ..errors import Unauthorized


def check_api_key(expected: str | None, headers: dict[bytes, bytes]) -> None:
    if not expected:
        return
    given = headers.get(b"x-api-key")
    if given is None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given, expected.encode()):
        raise Unauthorized("this endpoint needs the API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
