"""The tokenizer routes of language models (vLLM's ``/tokenize``, ``/detokenize``,
``/tokenizer_info``) and the OpenAI-side ``/health`` and ``/version``, as a mixin of the ASGI ``App``.

``/tokenize`` encodes as the completions and chat paths do (the chat template rendered, then encoded
with the tokenizer's special tokens), so ``count`` is the ``prompt_tokens`` a request would use.
``/detokenize`` keeps special tokens in the text, so it inverts ``/tokenize``. Errors are in
OpenAI's format, ``param`` included."""
from __future__ import annotations

from urllib.parse import parse_qs

from .. import __version__
from ..errors import InvalidInput, RtserveError
from ..models.llm import LLMModel
from .auth import check_api_key
from .protocols import tokenize as tp
from .responses import JSON, Response, json_response
from .scoring_routes import as_openai_error

TOKENIZER_PATHS = frozenset(("/tokenize", "/detokenize", "/tokenizer_info", "/health", "/version"))


class TokenizerRoutes:
    """Mixed into ``App``: uses its repository, ``_method`` and the OpenAI mixin's ``_body``/``_model``."""

    async def _tokenizer_route(self, scope, receive) -> Response:
        """``scope['path']`` (without a trailing slash) is one of ``TOKENIZER_PATHS``."""
        method, path = scope["method"], scope["path"].rstrip("/")
        try:
            if path == "/health":
                self._method(method, "GET")
                return Response(200)
            if path == "/version":
                self._method(method, "GET")
                return json_response({"version": __version__})
            if path == "/tokenizer_info":
                self._method(method, "GET")
                if self.config.protect_inference:
                    check_api_key(self.config.api_key, dict(scope["headers"]))
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                name = (query.get("model") or [None])[0]
                model = self._language_model(name or None, "/tokenizer_info")
                return Response(200, tp.tokenizer_info(model.name, model.tokenizer, model.max_model_len), JSON)
            self._method(method, "POST")
            body = await self._body(scope, receive)
            if path == "/tokenize":
                return self._tokenize(tp.parse_tokenize(body))
            return self._detokenize(tp.parse_detokenize(body))
        except RtserveError as e:
            raise as_openai_error(e) from None

    def _language_model(self, name: str | None, endpoint: str) -> LLMModel:
        """The language model named, or the only one served when none is named; it must have a
        tokenizer. 400 naming ``model`` for another kind, 404 for an unknown name."""
        if name is None:
            llms = [m for m in self.repository.ready_models() if isinstance(m, LLMModel)]
            if len(llms) != 1:
                raise InvalidInput(f"'model' is required: this server serves {len(llms)} language models",
                                   param="model")
            model = llms[0]
        else:
            model = self._model(name)
        if not isinstance(model, LLMModel):
            raise InvalidInput(f"model '{model.name}' is {model.described}: {endpoint} serves language models "
                               f"(this model is served by {model.api})", param="model")
        if model.tokenizer is None:
            raise InvalidInput(f"model '{model.name}' has no tokenizer.json: it takes and returns token ids only",
                               param="model")
        return model

    def _tokenize(self, req: tp.TokenizeRequest) -> Response:
        model = self._language_model(req.model, "/tokenize")
        tok = model.tokenizer
        text = req.prompt
        if req.messages is not None:
            from jinja2 import TemplateError

            try:
                text = tok.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt)
            except (ValueError, TemplateError) as e:
                raise InvalidInput(str(e), param="messages") from None
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        strs = [tok.hf.id_to_token(t) for t in ids] if req.return_token_strs else None
        return Response(200, tp.tokenize_response(ids, model.max_model_len, strs), JSON)

    def _detokenize(self, req: tp.DetokenizeRequest) -> Response:
        model = self._language_model(req.model, "/detokenize")
        tok = model.tokenizer
        bad = next((t for t in req.tokens if t >= tok.vocab_size), None)
        if bad is not None:
            raise InvalidInput(f"token id {bad} is not below the tokenizer's vocabulary size {tok.vocab_size}",
                               param="tokens")
        return json_response({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})
