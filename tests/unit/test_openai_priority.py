"""The OpenAI codec's request fields that reach the scheduler (``priority``) and its errors' headers."""
from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from rtserve.config import ServerConfig
from rtserve.errors import TooManyRequests
from rtserve.server.app import App
from rtserve.server.protocols.openai import OpenAIError, parse


def req(chat: bool, **fields) -> bytes:
    base = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})}
    return orjson.dumps({**base, **fields})


@pytest.mark.parametrize("chat", [False, True])
def test_priority_reaches_the_sampling_params(chat):
    assert parse(req(chat), chat).params.priority == 0  # vLLM's default
    assert parse(req(chat, priority=-7), chat).params.priority == -7
    assert parse(req(chat, priority=2**63 - 1), chat).params.priority == 2**63 - 1


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("value, needle", [("1", "'priority' must be an integer"), (2.5, "must be an integer"),
                                           (False, "must be an integer"), (2**63, "64-bit integer")])
def test_a_bad_priority_is_a_400_naming_it(chat, value, needle):
    with pytest.raises(OpenAIError) as e:
        parse(req(chat, priority=value), chat)
    assert e.value.status == 400 and e.value.param == "priority" and needle in e.value.message


def test_openai_errors_keep_their_headers(tmp_path):
    err = OpenAIError("busy", status=429, headers={"retry-after": "3"})
    assert err.headers == {"retry-after": "3"} and orjson.loads(err.body())["error"]["message"] == "busy"
    assert TooManyRequests("full", retry_after_s=2).headers == {"retry-after": "2"}

    async def main():
        app = App(ServerConfig(repository=str(tmp_path)))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.get("/v1/completions")  # 405: an RtserveError with an Allow header
        finally:
            await app.shutdown()

    r = asyncio.run(main())
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
