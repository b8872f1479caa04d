"""The OpenAI-compatible routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``), as a mixin of the ASGI ``App``: request lifecycle in docs/architecture.md."""
from __future__ import annotations

import asyncio
import time

from ..errors import NotFound, RtserveError
from ..llm.scheduler import RequestTooLarge
from ..metrics import LLMMetrics
from .auth import check_api_key
from .protocols import openai as oai
from .responses import JSON, Response, json_response


async def _timed(gen, lm: LLMMetrics, name: str, t_arrival: float):
    """Pass deltas through, recording TTFT, inter-token latency, queue time, e2e and token counts."""
    last, first = t_arrival, True
    try:
        async for d in gen:
            now = time.perf_counter()
            if d.token_ids:
                (lm.ttft if first else lm.itl).labels(name).observe(now - last)
                if first:
                    lm.queue.labels(name).observe(d.queue_s)
                first = False
                last = now
                lm.generation_tokens.labels(name).inc(len(d.token_ids))
            if d.finish_reason is not None:
                lm.requests.labels(name, d.finish_reason).inc()
                lm.prompt_tokens.labels(name).inc(d.num_prompt_tokens)
                lm.e2e.labels(name).observe(now - t_arrival)
            yield d
    finally:
        await gen.aclose()



class OpenAIRoutes:
    """Mixed into ``App``: uses its repository, config, metrics, ``_read_body`` and ``_method``."""

    async def _openai(self, scope, receive, send) -> Response | None:
        method, path = scope["method"], scope["path"].rstrip("/")
        try:
            if path == "/v1/models":
                self._method(method, "GET")
                data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "rtserve"}
                        for m in self.repository.ready_models() if m.kind in ("llm", "embedding")]
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
            raise oai.OpenAIError(e.message, status=e.status,
                                  type_="invalid_request_error" if e.status < 500 else "server_error") from None

    async def _generate(self, scope, receive, send, chat: bool) -> Response | None:
        headers = dict(scope["headers"])
        if self.config.protect_inference:
            check_api_key(self.config.api_key, headers)
        body = await self._read_body(scope, receive, headers)
        req = oai.parse(body, chat)
        try:
            model = self.repository.get(req.model)
        except NotFound:
            raise oai.OpenAIError(f"The model '{req.model}' does not exist", status=404, param="model") from None
        if model.kind == "embedding":
            raise oai.OpenAIError(f"model '{req.model}' is an embedding model: use /v1/embeddings", param="model")
        if model.kind != "llm":
            raise oai.OpenAIError(f"model '{req.model}' is a tensor model: use /v2/models/{req.model}/infer",
                                  param="model")
        llm = model.llm
        try:
            if chat:
                if llm.tokenizer is None:
                    raise ValueError("this model has no tokenizer, so it cannot chat")
                prompt = llm.tokenizer.apply_chat_template(req.messages)
            else:
                prompt = req.prompt
            prompt_ids = llm.encode(prompt)
            if any(t >= llm.runner.config.vocab_size for t in prompt_ids):
                raise ValueError(f"prompt token ids must be below the vocabulary size {llm.runner.config.vocab_size}")
        except ValueError as e:
            raise oai.OpenAIError(str(e), param="messages" if chat else "prompt") from None
        limit = model.max_model_len
        if req.max_tokens_given and len(prompt_ids) + req.params.max_tokens > limit:
            raise oai.OpenAIError(
                f"this model's maximum context is {limit} tokens; the prompt has {len(prompt_ids)} and max_tokens "
                f"asks for {req.params.max_tokens} more", param="max_tokens")
        builder = oai.ResponseBuilder(req, llm.tokenizer)
        lm = self.llm_metrics
        lm.bind(model.name, llm.scheduler)
        t_arrival = time.perf_counter()
        gen = _timed(model.engine.generate(prompt_ids, req.params), lm, model.name, t_arrival)
        task = asyncio.current_task()
        done = False
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(lambda w: task.cancel() if not done and not w.cancelled() else None)
        try:
            try:
                first = await gen.__anext__()
            except RequestTooLarge as e:
                raise oai.OpenAIError(str(e), param="messages" if chat else "prompt") from None
            if req.stream:
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
                started, completion = set(), 0
                d = first
                while d is not None:
                    await send({"type": "http.response.body", "more_body": True, "body": builder.chunk(
                        d.index, d.text, d.token_ids, d.logprobs, d.finish_reason, d.index not in started)})
                    started.add(d.index)
                    if d.finish_reason is not None:
                        completion += d.num_generated
                    d = await anext(gen, None)
                tail = builder.usage_chunk(first.num_prompt_tokens, completion) if req.include_usage else b""
                await send({"type": "http.response.body", "body": tail + oai.DONE})
                return None
            choices: dict[int, dict] = {}
            completion = 0
            d = first
            while d is not None:
                c = choices.setdefault(d.index, {"index": d.index, "text": "", "token_ids": [], "logprobs": None,
                                                 "finish_reason": None})
                c["text"] += d.text
                c["token_ids"] += d.token_ids
                if d.logprobs is not None:
                    c["logprobs"] = (c["logprobs"] or []) + d.logprobs
                if d.finish_reason is not None:
                    c["finish_reason"] = d.finish_reason
                    completion += d.num_generated
                d = await anext(gen, None)
            return Response(200, builder.final(list(choices.values()), first.num_prompt_tokens, completion), JSON)
        except asyncio.CancelledError:
            if done or watcher.cancelled() or not watcher.done():
                raise
            return None  # the client went away; the stream's cleanup aborted its sequences
        finally:
            done = True
            watcher.cancel()
            await gen.aclose()

    async def _embeddings(self, scope, receive) -> Response:
        """Tokenize (or take token ids), check lengths, await the model's batcher, encode."""
        headers = dict(scope["headers"])
        if self.config.protect_inference:
            check_api_key(self.config.api_key, headers)
        req = oai.parse_embeddings(await self._read_body(scope, receive, headers))
        try:
            model = self.repository.get(req.model)
        except NotFound:
            raise oai.OpenAIError(f"The model '{req.model}' does not exist", status=404, param="model") from None
        if model.kind != "embedding":
            use = "/v1/completions or /v1/chat/completions" if model.kind == "llm" else f"/v2/models/{req.model}/infer"
            raise oai.OpenAIError(f"model '{req.model}' is not an embedding model: use {use}", param="model")
        em = self.embedding_metrics
        em.bind(model)
        t0 = time.perf_counter()
        try:
            if req.dimensions is not None and req.dimensions != model.dimensions:
                raise oai.OpenAIError(f"'dimensions' must be {model.dimensions} for model '{req.model}' (its vectors "
                                      "are not trained to be truncated)", param="dimensions")
            try:
                token_ids = model.tokenize(req.texts) if req.texts is not None else req.token_ids
                model.check(token_ids)
            except ValueError as e:
                raise oai.OpenAIError(str(e), param="input") from None
            vectors = await model.embed(token_ids)
        except RtserveError:
            em.requests.labels(model.name, "error").inc()
            raise
        num_tokens = sum(len(ids) for ids in token_ids)
        body = oai.embeddings_response(req, vectors, num_tokens)
        em.requests.labels(model.name, "success").inc()
        em.prompt_tokens.labels(model.name).inc(num_tokens)
        em.latency.labels(model.name).observe(time.perf_counter() - t0)
        return Response(200, body, JSON)

    # -- body ---------------------------------------------------------------------------------
