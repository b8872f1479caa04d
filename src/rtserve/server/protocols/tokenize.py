"""The tokenizer API codec (vLLM's shapes): ``/tokenize``, ``/detokenize``, ``/tokenizer_info``.
No HTTP, no model. Requests are strict (an unknown field is a 400 naming it); ``model`` may be left
out when the server serves exactly one language model (the caller decides)."""
from __future__ import annotations

from dataclasses import dataclass

import orjson

from .openai import OpenAIError, _messages
from .scoring import strict_object

TOKENIZE_FIELDS = ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                   "return_token_strs")
DETOKENIZE_FIELDS = ("model", "tokens")


@dataclass
class TokenizeRequest:
    """Exactly one of ``prompt`` / ``messages`` is set."""

    model: str | None
    prompt: str | None
    messages: list[dict] | None
    add_special_tokens: bool = True  # as the completions and chat paths encode (the chat template's text too)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


def _doc(body: bytes, fields: tuple[str, ...], endpoint: str) -> tuple[dict, str | None]:
    doc = strict_object(body, fields, endpoint)
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise OpenAIError("'model' must be a non-empty string", param="model")
    return doc, model


def _flag(doc: dict, key: str, default: bool) -> bool:
    v = doc.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise OpenAIError(f"'{key}' must be a boolean", param=key)
    return v


def parse_tokenize(body: bytes) -> TokenizeRequest:
    doc, model = _doc(body, TOKENIZE_FIELDS, "/tokenize")
    prompt, has_messages = doc.get("prompt"), doc.get("messages") is not None
    if (prompt is None) == (not has_messages):
        raise OpenAIError("give exactly one of 'prompt' (a string) or 'messages' (a chat)",
                          param="messages" if has_messages else "prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise OpenAIError("'prompt' must be a string", param="prompt")
    if prompt is not None and doc.get("add_generation_prompt") is not None:
        raise OpenAIError("'add_generation_prompt' applies to 'messages' only", param="add_generation_prompt")
    messages = _messages(doc) if has_messages else None
    return TokenizeRequest(model, prompt, messages, _flag(doc, "add_special_tokens", True),
                           _flag(doc, "add_generation_prompt", True), _flag(doc, "return_token_strs", False))


def parse_detokenize(body: bytes) -> DetokenizeRequest:
    doc, model = _doc(body, DETOKENIZE_FIELDS, "/detokenize")
    tokens = doc.get("tokens")
    if not isinstance(tokens, list):
        raise OpenAIError("'tokens' is required: a list of token ids", param="tokens")
    for i, t in enumerate(tokens):
        if type(t) is not int or t < 0:  # noqa: E721 - true/false are not ids
            raise OpenAIError(f"tokens[{i}] must be a token id (an integer >= 0), got {t!r}", param="tokens")
    return DetokenizeRequest(model, tokens)


def tokenize_response(tokens: list[int], max_model_len: int, token_strs: list[str] | None) -> bytes:
    return orjson.dumps({"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
                         "token_strs": token_strs})


def tokenizer_info(model: str, tok, max_model_len: int) -> bytes:
    """``tok``: the language model's ``llm.tokenizer.Tokenizer``."""
    cfg = tok.config

    def text(key):
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

    def token_id(t):
        return tok.hf.token_to_id(t) if t else None

    limit = cfg.get("model_max_length")  # transformers writes 1e30 for "no limit": not a JSON integer

    return orjson.dumps({
        "model": model, "tokenizer_class": cfg.get("tokenizer_class") or "PreTrainedTokenizerFast",
        "vocab_size": tok.vocab_size, "max_model_len": max_model_len,
        "model_max_length": limit if isinstance(limit, int) and 0 < limit < 2 ** 53 else None,
        "bos_token": tok.bos_token, "bos_token_id": token_id(tok.bos_token),
        "eos_token": tok.eos_token, "eos_token_id": token_id(tok.eos_token),
        "pad_token": text("pad_token"), "unk_token": text("unk_token"),
        "chat_template": tok.chat_template})
