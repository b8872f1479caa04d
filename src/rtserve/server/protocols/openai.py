"""OpenAI-compatible API codec: /v1/completions, /v1/chat/completions and /v1/embeddings requests
into the engine's terms, responses and SSE chunks back, errors in OpenAI's format. No HTTP, no engine."""
from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from dataclasses import dataclass, field, replace

import orjson

from ...errors import RtserveError
from ...llm.sampling_params import SamplingParams
from . import openai_echo, openai_fields


def error_event(err: RtserveError) -> bytes:
    """A server-sent event carrying an error in OpenAI's format (a stream that cannot finish)."""
    body = {"message": err.message, "type": "invalid_request_error" if err.status < 500 else "server_error",
            "param": getattr(err, "param", None), "code": err.status}
    return b"data: " + orjson.dumps({"error": body}) + b"\n\n"


class OpenAIError(RtserveError):
    """Rendered as {"error": {"message", "type", "param", "code"}}, with ``headers`` (e.g.
    ``Retry-After`` on a 429) on the response."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status, self.param, self.type = status, param, type_

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": None}})


from . import openai_tools  # noqa: E402  (it imports OpenAIError from here)


@dataclass
class GenerationRequest:
    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict] | None     # chat
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool
    top_logprobs: int = 0
    max_tokens_given: bool = False  # asked for explicitly: over the context it is a 400, not a cap
    best_of_keep: int = 0  # best_of: params.n choices are generated, this many (the best) returned
    hide_logprobs: bool = False  # best_of asked the engine for logprobs the client did not
    tools: "openai_tools.ToolRequest | None" = None  # chat: tools, tool_choice (openai_tools)
    template_kwargs: dict = field(default_factory=dict)  # chat: chat_template_kwargs
    prompts: list = field(default_factory=list)  # completions: every prompt (``prompt`` is the first)
    echo: bool = False  # completions: the prompt (and its logprobs) before each choice's text
    prompt_logprobs: int | None = None  # vLLM's extra: the prompt's logprobs in vLLM's shape
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk


def _get(doc: dict, key: str, kinds, default=None):
    v = doc.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise OpenAIError(f"'{key}' must be {_kind_name(kinds)}", param=key)
    if not isinstance(v, kinds):
        raise OpenAIError(f"'{key}' must be {_kind_name(kinds)}", param=key)
    return v


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _logit_bias(doc: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: {"<token id>": bias in [-100, 100]}, as sorted (id, bias) pairs."""
    bias = _get(doc, "logit_bias", dict, {})
    out = []
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit()) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OpenAIError(f"'logit_bias' maps token ids (strings of digits) to numbers, got {k!r}: {v!r}",
                              param="logit_bias")
        out.append((int(k), float(v)))
    return tuple(sorted(out))


def _request_doc(body: bytes) -> tuple[dict, str]:
    """The JSON object of a request and its ``model`` (both endpoints require one)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise OpenAIError(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise OpenAIError("the body must be a JSON object")
    model = _get(doc, "model", str)
    if not model:
        raise OpenAIError("'model' is required", param="model")
    return doc, model


def _messages(doc: dict) -> list[dict]:
    """Chat messages; content parts are joined into one string (their text parts)."""
    messages = _get(doc, "messages", list)
    if not messages:
        raise OpenAIError("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise OpenAIError(f"messages[{i}].content: a text part's 'text' must be a string", param="messages")
            m = {**m, "content": "".join(texts)}
            messages[i] = m
        m = messages[i] = openai_tools.chat_message(messages, i)
        if not isinstance(m.get("content", ""), str) and not (m.get("content") is None and m.get("tool_calls")):
            raise OpenAIError(f"messages[{i}].content must be a string", param="messages")
    return messages


MAX_LOGPROBS = 20  # alternatives per token (logprobs, top_logprobs, prompt_logprobs)
MAX_STOP = 64  # stop strings a request (OpenAI takes 4): each is searched for after every token


def parse(body: bytes, chat: bool) -> GenerationRequest:
    doc, model = _request_doc(body)
    openai_fields.check(doc, openai_fields.CHAT if chat else openai_fields.COMPLETIONS)
    prompt = messages = None
    if chat:
        messages = _messages(doc)
    else:
        prompts = openai_echo.parse_prompts(doc.get("prompt"))
        prompt = prompts[0]
    stop = doc.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise OpenAIError("'stop' must be a string or a list of non-empty strings", param="stop")
    if stop is not None and len(stop) > MAX_STOP:
        raise OpenAIError(f"'stop' may hold at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    top_logprobs = 0
    if chat:
        want = _get(doc, "logprobs", bool, False)
        top_logprobs = _get(doc, "top_logprobs", int, 0)
        if not 0 <= top_logprobs <= 20:
            raise OpenAIError(f"'top_logprobs' must be in [0, 20], got {top_logprobs}", param="top_logprobs")
        logprobs = top_logprobs if want else None
        max_tokens = _get(doc, "max_completion_tokens", int)
        if max_tokens is None:
            max_tokens = _get(doc, "max_tokens", int)
        elif max_tokens < 1:
            raise OpenAIError(f"'max_completion_tokens' must be at least 1, got {max_tokens}",
                              param="max_completion_tokens")
    else:
        logprobs = _get(doc, "logprobs", int)
        max_tokens = _get(doc, "max_tokens", int, 16)
    echo = not chat and _get(doc, "echo", bool, False)
    prompt_logprobs = _get(doc, "prompt_logprobs", int)
    for name, v in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise OpenAIError(f"'{name}' must be in [0, {MAX_LOGPROBS}] (the supported maximum is {MAX_LOGPROBS}), "
                              f"got {v}", param=name)
    if max_tokens == 0 and not echo:
        raise OpenAIError("'max_tokens' must be at least 1 (0 only with echo: true, to score the prompt)",
                          param="max_tokens")
    scored = max((v for v in (prompt_logprobs, logprobs if echo else None) if v is not None), default=None)
    stream_options = _get(doc, "stream_options", dict, {})
    from .openai_structured import parse_structured  # it imports OpenAIError from here

    structured = parse_structured(doc)
    try:
        params = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 16 if not chat else 256,
            temperature=float(_get(doc, "temperature", (int, float), 1.0)),
            top_p=float(_get(doc, "top_p", (int, float), 1.0)),
            top_k=_get(doc, "top_k", int, 0) if doc.get("top_k") != -1 else 0,
            min_p=float(_get(doc, "min_p", (int, float), 0.0)),
            repetition_penalty=float(_get(doc, "repetition_penalty", (int, float), 1.0)),
            presence_penalty=float(_get(doc, "presence_penalty", (int, float), 0.0)),
            frequency_penalty=float(_get(doc, "frequency_penalty", (int, float), 0.0)),
            seed=_get(doc, "seed", int), stop=tuple(stop or ()),
            stop_token_ids=tuple(_get(doc, "stop_token_ids", list, [])),
            ignore_eos=_get(doc, "ignore_eos", bool, False), logprobs=logprobs, prompt_logprobs=scored,
            prompt_ranks=prompt_logprobs is not None,  # only vLLM's prompt_logprobs shape has ranks
            n=_get(doc, "n", int, 1),
            priority=_get(doc, "priority", int, 0), logit_bias=_logit_bias(doc), structured=structured)
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        raise OpenAIError(str(e), param=field) from None
    req = GenerationRequest(model=model, prompt=prompt, messages=messages, params=params,
                            stream=_get(doc, "stream", bool, False),
                            include_usage=_get(stream_options, "include_usage", bool, False), chat=chat,
                            top_logprobs=top_logprobs, prompts=prompts if not chat else [], echo=echo,
                            prompt_logprobs=prompt_logprobs,
                            continuous_usage=_get(stream_options, "continuous_usage_stats", bool, False),
                            max_tokens_given=any(doc.get(k) is not None for k in (
                                ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",))))
    return _best_of(doc, _with_tools(req, doc) if chat else req)

def _best_of(doc: dict, req: GenerationRequest) -> GenerationRequest:
    """Completions' ``best_of``: generate that many choices, return the n best (``best_choices``)."""
    if req.chat:
        return req
    best_of, n = _get(doc, "best_of", int), req.params.n
    if best_of is None or best_of == n:
        return req
    if not n < best_of <= 64:
        raise OpenAIError(f"'best_of' must be in [n, 64] (n is {n}), got {best_of}", param="best_of")
    if req.stream:
        raise OpenAIError("'best_of' above n cannot be streamed: the best are known at the end", param="best_of")
    lp = req.params.logprobs
    params = dataclasses.replace(req.params, n=best_of, logprobs=0 if lp is None else lp)
    return dataclasses.replace(req, params=params, best_of_keep=n, hide_logprobs=lp is None)


def best_choices(choices: list[dict], keep: int, hide_logprobs: bool) -> list[dict]:
    """The ``keep`` choices with the highest mean logprob per token (OpenAI's rule for best_of),
    best first, renumbered from 0."""
    def score(c: dict) -> float:
        lps = c["logprobs"] or []
        return sum(lp[0] for lp in lps) / len(lps) if lps else float("-inf")

    best = sorted(choices, key=lambda c: (-score(c), c["index"]))[:keep]
    return [{**c, "index": i, "logprobs": None if hide_logprobs else c["logprobs"]} for i, c in enumerate(best)]


def _with_tools(req: GenerationRequest, doc: dict) -> GenerationRequest:
    """Tools, tool_choice and chat_template_kwargs (``openai_tools``); a forced call constrains decoding."""
    tools = openai_tools.parse_tools(doc)
    req.tools, req.template_kwargs = tools, openai_tools.template_kwargs(doc)
    if tools.forced:
        if req.params.structured is not None:
            raise OpenAIError("a forced tool call (tool_choice 'required' or a function) cannot be combined with "
                              "another output constraint (response_format or structured_outputs)", param="tool_choice")
        req.params = replace(req.params, structured=tools.structured())
    return req


class ResponseBuilder:
    """Builds the response or the stream chunks of one request. Completions: ``prompt_ids`` (set
    once the prompts are tokenized) are echoed and scored; choice ``index`` // ``params.n`` is its prompt."""

    def __init__(self, req: GenerationRequest, tokenizer) -> None:
        self.req, self.tok = req, tokenizer
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        self.decode = openai_echo.decoder(tokenizer)
        self.prompt_ids: list[list[int]] = []
        self._offsets: dict[int, int] = {}  # streamed: text_offset of each choice's next token

    def _chat_logprobs(self, token_ids: list[int], lps: list | None):
        if lps is None:
            return None
        decode = self.decode
        return {"content": [{"token": decode(t), "logprob": lp[0], "bytes": list(decode(t).encode()),
                             "top_logprobs": [{"token": decode(a), "logprob": v, "bytes": list(decode(a).encode())}
                                              for a, v in lp[1]]} for t, lp in zip(token_ids, lps)]}

    def prompt_text(self, p: int) -> str:
        prompt = self.req.prompts[p]
        return prompt if isinstance(prompt, str) else self.tok.decode(prompt) if self.tok else ""

    def _completion(self, c: dict, first: bool = True) -> dict:
        """A completions choice: the echoed prompt (on a choice's first chunk), logprobs, prompt_logprobs."""
        req = self.req
        p = c["index"] // req.params.n
        echo, plps = req.echo and first, c.get("prompt_logprobs")
        text, lp = c["text"], None
        if c["logprobs"] is not None or echo and req.params.logprobs is not None:
            entries = openai_echo.generated_entries(self.decode, c["token_ids"], c["logprobs"] or [])
            if echo and plps is not None:
                entries = openai_echo.prompt_entries(self.decode, self.prompt_ids[p], plps, req.params.logprobs) + entries
            start = self._offsets.get(c["index"], 0)  # streamed: offsets run on across a choice's chunks
            lp = openai_echo.legacy(entries, start)
            self._offsets[c["index"]] = start + sum(len(e.token) for e in entries)
        out = {"index": c["index"], "text": self.prompt_text(p) + text if echo else text, "logprobs": lp,
               "finish_reason": c["finish_reason"]}
        if req.prompt_logprobs is not None and first:
            out["prompt_logprobs"] = None if plps is None else openai_echo.vllm_prompt_logprobs(
                self.decode, plps, req.prompt_logprobs)
        return out

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
        out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": prompt_tokens + completion_tokens}
        if cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return out

    def final(self, choices: list[dict], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        req, n = self.req, self.req.params.n
        if req.best_of_keep:  # per prompt; usage counts every choice generated, as OpenAI bills them
            groups: dict[int, list] = {}
            for c in choices:
                groups.setdefault(c["index"] // n, []).append(c)
            choices = [{**c, "index": p * req.best_of_keep + c["index"]} for p, g in sorted(groups.items())
                       for c in best_choices(g, req.best_of_keep, req.hide_logprobs)]
            req = self.req = dataclasses.replace(req, params=dataclasses.replace(
                req.params, n=req.best_of_keep, logprobs=None if req.hide_logprobs else req.params.logprobs))
        out, extra = [], {}
        for c in sorted(choices, key=lambda c: c["index"]):
            if req.chat:
                out.append({"index": c["index"], "message": c.get("message") or {"role": "assistant", "content": c["text"]},
                            "logprobs": self._chat_logprobs(c["token_ids"], c["logprobs"]),
                            "finish_reason": c["finish_reason"]})
                if req.prompt_logprobs is not None and c["index"] == 0 and c.get("prompt_logprobs") is not None:
                    extra["prompt_logprobs"] = openai_echo.vllm_prompt_logprobs(
                        self.decode, c["prompt_logprobs"], req.prompt_logprobs)
            else:
                out.append(self._completion(c))
        return orjson.dumps({"id": self.id, "object": self.object, "created": self.created, "model": req.model,
                             "choices": out, "usage": self.usage(prompt_tokens, completion_tokens, cached_tokens),
                             **extra})

    def chunk(self, index: int, text: str, token_ids: list[int], lps, finish_reason: str | None,
              first: bool, delta: dict | None = None, prompt_logprobs: list | None = None,
              usage: dict | None = None) -> bytes:
        """``delta``: a chat chunk's delta in place of ``{"content": text}`` (tool calls, reasoning).
        ``prompt_logprobs``: the choice's scored prompt (its first chunk). ``usage``: continuous usage."""
        if self.req.chat:
            delta = {"content": text} if delta is None else delta
            delta = {"role": "assistant", **delta} if first else delta
            choice = {"index": index, "delta": delta, "logprobs": self._chat_logprobs(token_ids, lps),
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = self._completion({"index": index, "text": text, "token_ids": token_ids, "logprobs": lps,
                                       "finish_reason": finish_reason, "prompt_logprobs": prompt_logprobs}, first)
            obj = "text_completion"
        doc = {"id": self.id, "object": obj, "created": self.created, "model": self.req.model, "choices": [choice]}
        if self.req.chat and prompt_logprobs is not None and self.req.prompt_logprobs is not None and index == 0:
            doc["prompt_logprobs"] = openai_echo.vllm_prompt_logprobs(self.decode, prompt_logprobs, self.req.prompt_logprobs)
        if self.req.include_usage or usage is not None:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return b"data: " + orjson.dumps({"id": self.id, "object": obj, "created": self.created,
                                         "model": self.req.model, "choices": [],
                                         "usage": self.usage(prompt_tokens, completion_tokens, cached_tokens)}) + b"\n\n"


DONE = b"data: [DONE]\n\n"


# -- /v1/embeddings ------------------------------------------------------------------------------
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per request


@dataclass
class EmbeddingRequest:
    """Exactly one of ``texts`` / ``token_ids`` is set. Token ids are taken as the full sequence
    (no special tokens added), as vLLM does."""

    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    encoding_format: str  # float | base64
    dimensions: int | None  # must equal the model's size (checked by the caller, which knows it)

    @property
    def num_inputs(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def parse_embeddings(body: bytes) -> EmbeddingRequest:
    """OpenAI's embeddings request: ``input`` is a string, a list of strings, a list of token ids
    or a list of lists of token ids; ``user`` is checked, not used (``openai_fields``). Raises OpenAIError (400)."""
    doc, model = _request_doc(body)
    openai_fields.check(doc, openai_fields.EMBEDDINGS)
    inp = doc.get("input")
    texts = token_ids = None
    shape = "'input' must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        texts = inp
    elif isinstance(inp, list) and inp and all(_is_id(x) for x in inp):
        token_ids = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, list) for x in inp):
        for i, ids in enumerate(inp):
            if not ids or not all(_is_id(t) for t in ids):
                raise OpenAIError(f"input[{i}] must be a non-empty list of token ids (integers >= 0)", param="input")
        token_ids = inp
    elif isinstance(inp, list) and not inp:
        raise OpenAIError("'input' must not be empty", param="input")
    else:
        raise OpenAIError(shape + (" (a list must not mix kinds)" if isinstance(inp, list) else ""), param="input")
    if texts is not None:
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise OpenAIError("'input' is an empty string" if isinstance(inp, str) else
                              f"input[{empty}] is an empty string", param="input")
    n = len(texts if texts is not None else token_ids)
    if n > MAX_EMBEDDING_INPUTS:
        raise OpenAIError(f"'input' has {n} items; at most {MAX_EMBEDDING_INPUTS} per request", param="input")
    fmt = _get(doc, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise OpenAIError(f"'encoding_format' must be 'float' or 'base64', got '{fmt}'", param="encoding_format")
    dimensions = _get(doc, "dimensions", int)
    if dimensions is not None and dimensions < 1:
        raise OpenAIError("'dimensions' must be a positive integer", param="dimensions")
    _get(doc, "user", str)
    return EmbeddingRequest(model=model, texts=texts, token_ids=token_ids, encoding_format=fmt, dimensions=dimensions)


def embeddings_response(req: EmbeddingRequest, vectors, prompt_tokens: int) -> bytes:
    """``vectors``: (N, D) float32 numpy array. base64 is the little-endian float32 bytes, which
    the openai client decodes (it asks for base64 unless told otherwise)."""
    if req.encoding_format == "base64":
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        rows = list(vectors)
    return orjson.dumps({"object": "list", "model": req.model,
                         "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)
