"""Methods and connection handling in-process (httpx.ASGITransport): every route answers a wrong
method with 405 and an ``Allow`` header (OpenAI routes included), an unknown path is a 404 whatever
the method, and a 413 tells the client the connection closes."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from rtserve.config import ServerConfig
from rtserve.server.app import App
from servers import repository_index, serve_in_process  # noqa: E402

GET_ROUTES = ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/affine", "/v2/models/affine/ready",
              "/v2/models/affine/config", "/v2/models/affine/versions/2", "/v2/models/affine/versions/2/ready",
              "/v2/models/affine/versions/2/config", "/metrics", "/openapi.json", "/v1/models", "/health", "/version"]
POST_ROUTES = ["/v2/models/affine/infer", "/v2/models/affine/versions/2/infer", "/v2/repository/index",
               "/v2/repository/models/affine/load", "/v2/repository/models/affine/unload",
               "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank",
               "/v1/score", "/score", "/tokenize", "/detokenize"]
UNKNOWN = ["/v2/models/affine/bogus", "/v2/models/affine/versions", "/v2/health/bogus", "/v2/repository/bogus",
           "/v2/repository/models/affine/reload", "/v1/bogus", "/nothing", "/v1/rerank/x", "/tokenize/x"]


_with_app = serve_in_process


def test_every_route_answers_a_wrong_method_with_405_and_allow(affine_repo):
    async def fn(c):
        for path in GET_ROUTES:
            for method in ("POST", "PUT", "DELETE", "OPTIONS"):
                r = await c.request(method, path)
                assert r.status_code == 405, (method, path, r.text)
                assert r.headers.get("allow") == "GET, HEAD", (method, path)
            r = await c.head(path)
            assert r.status_code in (200, 503), (path, r.status_code)  # HEAD is allowed wherever GET is
        for path in POST_ROUTES:
            for method in ("GET", "HEAD", "PUT", "DELETE"):
                r = await c.request(method, path)
                assert r.status_code == 405, (method, path, r.text)
                assert r.headers.get("allow") == "POST", (method, path)
        r = await c.get("/v1/completions")  # OpenAI's error format, with the header
        assert r.json()["error"]["message"].startswith("method GET is not allowed")

    _with_app(affine_repo, fn)


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_an_unknown_path_is_404_whatever_the_method(affine_repo, method):
    async def fn(c):
        for path in UNKNOWN:
            r = await c.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code)
            assert "allow" not in r.headers

    _with_app(affine_repo, fn)


def test_413_answers_connection_close(affine_repo):
    async def fn(c):
        for path in ("/v2/models/affine/infer", "/v2/repository/index", "/v1/completions"):
            r = await c.post(path, content=b"{" + b" " * 5000 + b"}")
            assert r.status_code == 413, (path, r.text)
            assert r.headers["connection"] == "close", path
        r = await c.post("/v2/models/affine/infer", content=b"{not json")
        assert r.status_code == 400 and "connection" not in r.headers  # only a 413 leaves a body unread

    _with_app(affine_repo, fn, max_body_bytes=4096)
