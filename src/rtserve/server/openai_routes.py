"""The OpenAI API routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``), as a mixin of the ASGI ``App``: parse, call one method of the model, build the
response (streamed as server-sent events, or collected). Request lifecycle in docs/architecture.md."""
from __future__ import annotations

from ..errors import NotFound, RtserveError
from ..models.base import ServedModel
from ..models.llm import failure_error
from .auth import check_api_key
from .completions import Usage, open_prompts
from .chat_output import ChoiceStream, for_request
from .protocols import openai as oai
from .responses import JSON, ClientGone, Response, json_response, until_disconnect


class OpenAIRoutes:
    """Mixed into ``App``: uses its repository, config, ``_read_body`` and ``_method``."""

    async def _openai(self, scope, receive, send) -> Response | None:
        method, path = scope["method"], scope["path"].rstrip("/")
        try:
            if path == "/v1/models":
                self._method(method, "GET")
                data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "rtserve"}
                        for m in self.repository.ready_models() if m.openai]
                return json_response({"object": "list", "data": data})
            if path in ("/v1/completions", "/v1/chat/completions"):
                self._method(method, "POST")
                return await self._generate(scope, receive, send, chat=path.endswith("chat/completions"))
            if path == "/v1/embeddings":
                self._method(method, "POST")
                return await self._embeddings(scope, receive)
            raise NotFound(f"no route for {method} {scope['path']}")
        except oai.OpenAIError:
            raise
        except RtserveError as e:
            raise oai.OpenAIError(e.message, status=e.status, param=e.param, type_=_error_type(e.status),
                                  headers=e.headers) from None

    async def _body(self, scope, receive) -> bytes:
        headers = dict(scope["headers"])
        if self.config.protect_inference:
            check_api_key(self.config.api_key, headers)
        return await self._read_body(scope, receive, headers)

    def _model(self, name: str) -> ServedModel:
        try:
            return self.repository.get(name)
        except NotFound:
            raise oai.OpenAIError(f"The model '{name}' does not exist", status=404, param="model") from None

    async def _generate(self, scope, receive, send, chat: bool) -> Response | None:
        """Completions and chat: the model prepares and streams, ``_stream``/``_collect`` answer."""
        req = oai.parse(await self._body(scope, receive), chat)
        model = self._model(req.model)
        output = for_request(req, model) if chat else None  # tool calls, reasoning (chat_output)

        async def answer() -> Response | None:
            prompt_ids = []
            if chat:
                deltas = await model.open_stream(None, req.messages, req.params, max_tokens_given=req.max_tokens_given,
                                                 # None, not []: templates test "tools is not none"
                                                 tools=req.tools.tools or None if req.tools else None,
                                                 template_kwargs=req.template_kwargs)
            else:
                deltas, prompt_ids = await open_prompts(model, req)
            builder = oai.ResponseBuilder(req, model.tokenizer)
            builder.prompt_ids = prompt_ids
            try:
                if req.stream:
                    await _stream(send, builder, deltas, req.include_usage, output)
                    return None
                return Response(200, await _collect(builder, deltas, output), JSON)
            finally:
                await deltas.aclose()

        try:
            return await until_disconnect(receive, answer())
        except ClientGone:
            return None  # the stream's cleanup aborted its sequences

    async def _embeddings(self, scope, receive) -> Response:
        req = oai.parse_embeddings(await self._body(scope, receive))
        model = self._model(req.model)
        vectors, num_tokens = await model.embed_texts(req.texts, req.token_ids, req.dimensions)
        return Response(200, oai.embeddings_response(req, vectors, num_tokens), JSON)


def _error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"


async def _stream(send, builder: oai.ResponseBuilder, deltas, include_usage: bool, output=None) -> None:
    """Server-sent events: one chunk per delta (with ``output``, read by a ``ChoiceStream`` per
    choice; a chunk with nothing to say is left out), the usage chunk if asked for, then ``[DONE]``."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    started, usage = set(), Usage(builder.req.params.n)
    streams: dict[int, ChoiceStream] = {}
    async for d in deltas:
        usage.add(d)
        delta, finish = None, d.finish_reason
        if output is not None:
            st = streams.setdefault(d.index, output.stream())
            delta = st.feed(d.text)
            if finish is not None:
                last, finish = st.finish(finish)
                delta = _merge(delta, last)
        if delta or delta is None or d.index not in started or finish is not None or d.logprobs:
            await send({"type": "http.response.body", "more_body": True, "body": builder.chunk(
                d.index, d.text, d.token_ids, d.logprobs, finish, d.index not in started, delta, d.prompt_logprobs,
                builder.usage(*usage.totals) if builder.req.continuous_usage else None)})
        started.add(d.index)
        if d.failure is not None:  # the choice ended with finish_reason "abort": say why, then end
            await send({"type": "http.response.body", "body": oai.error_event(failure_error(d.failure)) + oai.DONE})
            return
    tail = builder.usage_chunk(*usage.totals) if include_usage else b""
    await send({"type": "http.response.body", "body": tail + oai.DONE})


def _merge(a: dict, b: dict) -> dict:
    """Two chat deltas as one (strings joined, tool-call items one after the other)."""
    out = dict(a)
    for k, v in b.items():
        if k == "function_call" and k in out:  # the deprecated API's one call: name once, arguments joined
            v = {**out[k], **v, "arguments": out[k].get("arguments", "") + v.get("arguments", "")}
        out[k] = out[k] + v if k in out and k != "function_call" else v
    return out


async def _collect(builder: oai.ResponseBuilder, deltas, output=None) -> bytes:
    """One response body with every choice's text, tokens, logprobs and finish reason."""
    choices: dict[int, dict] = {}
    usage = Usage(builder.req.params.n)
    async for d in deltas:
        c = choices.setdefault(d.index, {"index": d.index, "text": "", "token_ids": [], "logprobs": None,
                                         "finish_reason": None, "prompt_logprobs": None})
        if d.failure is not None:
            raise failure_error(d.failure)
        usage.add(d)
        c["text"] += d.text
        c["token_ids"] += d.token_ids
        if d.prompt_logprobs is not None:
            c["prompt_logprobs"] = d.prompt_logprobs
        if d.logprobs is not None:
            c["logprobs"] = (c["logprobs"] or []) + d.logprobs
        if d.finish_reason is not None:
            c["finish_reason"] = d.finish_reason
    if output is not None:
        for c in choices.values():
            c["message"], c["finish_reason"] = output.message(c["text"], c["finish_reason"])
    return builder.final(list(choices.values()), *usage.totals)
