"""The ASGI application: routing, body limits, auth, errors, lifespan.

Written directly against ASGI (no web framework) because per-request HTTP + JSON cost is what a
small model's latency is made of on a CPU. Protocol codecs live in ``protocols/``.
"""
from __future__ import annotations

import asyncio
import logging
import zlib

import orjson

from .. import __version__
from ..config import ServerConfig
from ..errors import InvalidInput, NotFound, PayloadTooLarge, RtserveError, Unavailable
from ..metrics import Registry, ServingMetrics
from ..repository import ModelRepository
from .auth import check_api_key
from .openapi import openapi_document
from .openai_routes import OpenAIRoutes
from .protocols import kserve_v2
from .protocols import openai as oai
from .responses import JSON, ClientGone, Response, error_headers, error_response, json_response, until_disconnect
from .scoring_routes import SCORING_PATHS, ScoringRoutes
from .tokenize_routes import TOKENIZER_PATHS, TokenizerRoutes

log = logging.getLogger("rtserve.server")

class App(OpenAIRoutes, ScoringRoutes, TokenizerRoutes):
    """rtserve's HTTP server application (ASGI 3)."""

    def __init__(self, config: ServerConfig, repository: ModelRepository | None = None) -> None:
        self.config = config
        self.registry = Registry()
        self.metrics = ServingMetrics(self.registry)
        self.repository = repository or ModelRepository(config.repository, self.metrics,
                                                        allow_symlinks=config.allow_symlinks)
        if self.repository.metrics is None:
            self.repository.metrics = self.metrics
        self.started = False
        self.shutting_down = False
        self._openapi = orjson.dumps(openapi_document())

    # -- ASGI entry ---------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # a broken repository folder: report, do not hang
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.repository.load_all()
        self.started = True

    def begin_shutdown(self) -> None:
        """SIGTERM/SIGINT (on the loop): readiness turns 503, and every model starts draining at
        once, so streams still running get their terminal events (a final chunk, an error, [DONE])
        within 80% of ``shutdown_timeout_s``, before the server stops waiting for connections."""
        if self.shutting_down:
            return
        self.shutting_down = True
        timeout = 0.8 * self.config.shutdown_timeout_s
        log.info("shutting down: draining every model for up to %.1f s", timeout)
        self._drain = asyncio.ensure_future(asyncio.gather(
            *(m.drain(timeout) for m in self.repository.ready_models()), return_exceptions=True))

    async def shutdown(self) -> None:
        self.shutting_down = True
        await self.repository.close(self.config.shutdown_timeout_s)

    async def _http(self, scope, receive, send) -> None:
        try:
            path = scope["path"].rstrip("/")
            if path in SCORING_PATHS:
                resp = await self._scoring(scope, receive)
            elif path in TOKENIZER_PATHS:
                resp = await self._tokenizer_route(scope, receive)
            elif scope["path"].startswith("/v1/"):
                resp = await self._openai(scope, receive, send)
                if resp is None:  # streamed, or the client went away
                    return
            else:
                resp = await self._route(scope, receive)
        except oai.OpenAIError as e:
            resp = Response(e.status, e.body(), error_headers(e))
        except RtserveError as e:
            resp = error_response(e)
        except ClientGone:
            return
        except Exception as e:  # never crash the connection on a bug: answer 500 and log it
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            resp = json_response({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        headers = resp.headers
        if resp.status == 413:  # the rest of the body is unread: close the connection rather than read it
            headers = [*headers, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": resp.body})

    # -- routing ------------------------------------------------------------------------------
    async def _route(self, scope, receive) -> Response:
        method = scope["method"]
        parts = scope["path"].strip("/").split("/")
        head = parts[0]
        if head == "v2":
            n = len(parts)
            if n == 1:
                self._method(method, "GET")
                return json_response({"name": "rtserve", "version": __version__, "extensions": kserve_v2.EXTENSIONS})
            section = parts[1]
            if section == "models" and n >= 3:
                return await self._model_route(scope, receive, method, parts[2], parts[3:])
            if section == "health" and n == 3 and parts[2] in ("live", "ready"):
                self._method(method, "GET")
                if parts[2] == "live":
                    return Response(200)
                return Response(200 if self.started and not self.shutting_down else 503)
            if section == "repository":
                return await self._repository_route(scope, receive, method, parts[2:])
        elif head == "metrics" and len(parts) == 1:
            self._method(method, "GET")
            return Response(200, self.registry.render().encode(),
                            [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
        elif head == "openapi.json" and len(parts) == 1:
            self._method(method, "GET")
            return Response(200, self._openapi, JSON)
        raise NotFound(f"no route for {method} {scope['path']}")

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        """405 with ``Allow`` unless ``method`` is ``allowed`` (GET routes answer HEAD too). Called once
        the path is known to name a route: an unknown path is a 404 whatever its method."""
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            err = RtserveError(f"method {method} is not allowed here; use {allowed}", headers={"allow": allow})
            err.status = 405
            raise err

    async def _model_route(self, scope, receive, method, name, rest) -> Response:
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "config", "infer"):
            raise NotFound(f"no route for {method} {scope['path']}")
        if action == "infer":
            self._method(method, "POST")
            headers = dict(scope["headers"])
            if self.config.protect_inference:
                check_api_key(self.config.api_key, headers)
            return await self._infer(scope, receive, headers, name, version)
        self._method(method, "GET")
        if action == "":
            meta = self.repository.get(name, version).metadata()
            if version is None:  # the model, not one version: list every version it serves
                meta["versions"] = self.repository.served_versions(name)
            return json_response(meta)
        if action == "ready":
            try:
                self.repository.get(name, version)
            except Unavailable:
                return Response(503)
            return Response(200)
        return json_response(self.repository.get(name, version).config_json())

    async def _repository_route(self, scope, receive, method, rest) -> Response:
        action = len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload")
        if rest != ["index"] and not action:
            raise NotFound(f"no route for {method} {scope['path']}")
        self._method(method, "POST")
        check_api_key(self.config.api_key, dict(scope["headers"]))
        await self._read_body(scope, receive, dict(scope["headers"]))
        if not action:
            return json_response(self.repository.index())
        if rest[2] == "load":
            await self.repository.load(rest[1])
        else:
            await self.repository.unload(rest[1], self.config.shutdown_timeout_s)
        return Response(200, b"{}", JSON)

    # -- request bodies -------------------------------------------------------------------------
    async def _read_body(self, scope, receive, headers: dict) -> bytes:
        limit = self.config.max_body_bytes
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                raise InvalidInput("Content-Length is not an integer") from None
            if declared > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get(b"content-encoding")
        if encoding in (b"gzip", b"deflate"):
            d = zlib.decompressobj(wbits=31 if encoding == b"gzip" else 15)
            try:
                body = d.decompress(body, limit + 1)
            except zlib.error as e:
                raise InvalidInput(f"request body is not valid {encoding.decode()} data: {e}") from None
            if len(body) > limit:
                raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
        elif encoding not in (None, b"identity"):
            raise InvalidInput(f"unsupported Content-Encoding '{encoding.decode(errors='replace')}'; use gzip or deflate")
        return body

    # -- inference ----------------------------------------------------------------------------
    async def _infer(self, scope, receive, headers: dict, name: str, version: str | None) -> Response:
        """KServe v2 inference, tensor models and ensembles alike: decode, ``model.infer``, encode."""
        model = self.repository.get(name, version)
        model.admit()  # a full queue answers 503 before the body is read
        body = await self._read_body(scope, receive, headers)
        try:
            dec = kserve_v2.decode_request(body, kserve_v2.header_length(headers), model.check_input)
        except InvalidInput:
            model.count_rejected("invalid_input")
            raise
        outputs = await until_disconnect(receive, model.infer(dec.tensor_request()))
        items = [(n, a, dec.binary(n)) for n, a in outputs.items()]
        body, json_len = kserve_v2.encode_response(model.name, str(model.version), dec.id, items)
        if json_len is None:
            return Response(200, body, JSON)
        return Response(200, body, [(b"content-type", b"application/octet-stream"),
                                    (b"inference-header-content-length", str(json_len).encode())])
