"""Every request field of OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/embeddings``
(the API reference and the ``openai`` SDK's ``*_create_params.py``), and the vLLM extras rtserve knows:
what rtserve does with each. No field is silently ignored: one not in this table is a 400 naming it;
a refused one is a 400 saying why (``null`` is the same as absent, so it is taken for every field).
The table is rendered for the README by ``markdown_table()`` and completes ``/openapi.json``'s
request schemas (``complete_schema``)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

COMPLETIONS, CHAT, EMBEDDINGS = "completions", "chat", "embeddings"
PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions", EMBEDDINGS: "/v1/embeddings"}
_C, _H, _E, _G = (COMPLETIONS,), (CHAT,), (EMBEDDINGS,), (CHAT, COMPLETIONS)


class Status(str, Enum):
    IMPLEMENTED = "implemented"
    NO_EFFECT = "accepted-without-effect"  # nothing it could change in the output; validated, then unused
    REFUSED = "refused"  # a 400 saying why, except for the values ``accepts`` takes (defaults, no effect)


@dataclass(frozen=True)
class Field:
    name: str
    endpoints: tuple[str, ...]
    status: Status
    note: str  # one line, in the README; for a refused field, also the 400's reason
    source: str = "OpenAI"  # or "vLLM": an extra of vLLM's API that rtserve knows
    accepts: Callable[[Any, dict], bool] | None = None  # (value, request) -> taken; not for implemented fields
    schema: dict | None = None  # the values taken, for /openapi.json (implemented: openapi.py's own, or any)
    invalid: str = ""  # the 400's message when ``accepts`` refuses a value

    @property
    def message(self) -> str:
        return self.invalid or f"'{self.name}' is not supported: {self.note}"


def _same(v, w) -> bool:  # 0 == False in Python: compare the JSON kinds too
    return type(v) is type(w) and v == w


def _only(*values) -> Callable[[Any, dict], bool]:
    return lambda v, doc: any(_same(v, w) for w in values)


def _enum(*values) -> dict:
    return {"enum": [*values, None]}


def _is_str(v, doc) -> bool:
    return isinstance(v, str)


def _str_map(v, doc) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _impl(name, ends, note, source="OpenAI"):
    return Field(name, ends, Status.IMPLEMENTED, note, source)


def _unused(name, ends, note, accepts, schema, invalid, source="OpenAI"):
    return Field(name, ends, Status.NO_EFFECT, note, source, accepts, schema, f"'{name}' {invalid}")


def _refused(name, ends, note, accepts=None, schema=None, source="OpenAI"):
    return Field(name, ends, Status.REFUSED, note, source, accepts,
                 schema if schema is not None else {"type": "null"})


_STRING = {"type": ["string", "null"]}
FIELDS: tuple[Field, ...] = (
    # -- OpenAI, every endpoint ----------------------------------------------------------------------
    _impl("model", (*_G, *_E), "the served model's name (GET /v1/models); unknown -> 404"),
    _unused("user", (*_G, *_E), "an end-user id for OpenAI's abuse monitoring: checked to be a string, "
            "not stored or logged", _is_str, _STRING, "must be a string"),
    # -- OpenAI, chat and completions ----------------------------------------------------------------
    _impl("frequency_penalty", _G, "in [-2, 2], over the generated tokens"),
    _impl("presence_penalty", _G, "in [-2, 2], over the generated tokens"),
    _impl("logit_bias", _G, "token id (a string) -> bias in [-100, 100], added to the logits before "
          "penalties and logprobs; ids outside the vocabulary -> 400"),
    _impl("max_tokens", _G, "default 16 (completions) or 256 (chat); over the context -> 400; 0 only with echo"),
    _impl("n", _G, "choices per request, 1 to 64"),
    _impl("seed", _G, "64-bit; choice i draws from a generator seeded with seed + i, whatever the batch"),
    _impl("stop", _G, "a string or a list of up to 64 strings; the stop text is not returned"),
    _impl("stream", _G, "server-sent events, ending with data: [DONE]"),
    _impl("stream_options", _G, "with stream: true only; include_usage: a last chunk with the usage; "
          "continuous_usage_stats: the usage so far on every chunk (vLLM); include_obfuscation: taken, no "
          "padding is sent; other keys -> 400"),
    _impl("temperature", _G, "in [0, 100]; 0 is greedy"),
    _impl("top_p", _G, "in (0, 1]"),
    # -- OpenAI, completions -------------------------------------------------------------------------
    _impl("prompt", _C, "a string, token ids, or a list of strings or of token-id lists: n choices per prompt, "
          "index = prompt index * n + i"),
    _impl("logprobs", _G, "completions: the number of top alternatives, 0 to 20, with text_offset; chat: a boolean"),
    _impl("best_of", _C, "best_of choices are generated and the n with the highest mean logprob per token "
          "returned (all count in usage); above n, not with stream"),
    _impl("echo", _C, "the prompt before each choice's text; with logprobs, the prompt's tokens first (the first "
          "one's logprob null); with max_tokens 0, scores the prompt without generating"),
    _refused("suffix", _C, "this model does no fill-in-the-middle; only null or an empty string is "
             "accepted", _only(""), _enum("")),
    # -- OpenAI, chat --------------------------------------------------------------------------------
    _impl("messages", _H, "rendered by the model's chat template; content: a string or text parts "
          "(image, audio and file parts -> 400: this model takes text only)"),
    _impl("max_completion_tokens", _H, "as max_tokens, and wins over it; 0 -> 400"),
    _impl("top_logprobs", _H, "0 to 20 alternatives per token, with logprobs: true"),
    _impl("response_format", _G, "text, json_object or json_schema: constrained decoding (structured outputs, "
          "llguidance); an invalid schema -> 400 before anything is queued"),
    _impl("tools", _H, "function tools, given to the chat template; calls come back in message.tool_calls"),
    _impl("tool_choice", _H, "none, auto, required or a named function"),
    _impl("parallel_tool_calls", _H, "whether one answer may hold several tool calls"),
    _impl("functions", _H, "deprecated spelling of tools (function calling)"),
    _impl("function_call", _H, "deprecated spelling of tool_choice"),
    _refused("audio", _H, "this model takes and gives text only"),
    _refused("modalities", _H, "this model takes and gives text only; only [\"text\"] is accepted",
             _only(["text"]), {"type": ["array", "null"], "items": {"enum": ["text"]}, "minItems": 1,
                               "maxItems": 1}),
    _refused("prediction", _H, "predicted outputs are not implemented"),
    _refused("web_search_options", _H, "rtserve does no web search"),
    _refused("moderation", _H, "rtserve runs no moderation model"),
    _refused("reasoning_effort", _H, "this model has no reasoning-effort control"),
    _refused("verbosity", _H, "this model has no verbosity control"),
    _refused("store", _H, "rtserve stores no completions; only false is accepted", _only(False), _enum(False)),
    _refused("service_tier", _H, "rtserve has one service tier; only \"auto\" or \"default\" is accepted",
             _only("auto", "default"), _enum("auto", "default")),
    _unused("metadata", _H, "tags for OpenAI's stored completions: checked to be an object of strings, "
            "not stored or logged", _str_map, {"type": ["object", "null"], "additionalProperties":
                                               {"type": "string"}}, "must be an object of strings"),
    _unused("safety_identifier", _H, "an end-user id for OpenAI's safety checks: checked to be a string, "
            "not stored or logged", _is_str, _STRING, "must be a string"),
    _unused("prompt_cache_key", _H, "a cache hint: rtserve's prefix cache matches prompts by their tokens, "
            "no key needed", _is_str, _STRING, "must be a string"),
    _unused("prompt_cache_retention", _H, "a cache lifetime hint: no effect on the output",
            _only("in_memory", "24h"), _enum("in_memory", "24h"), "must be \"in_memory\" or \"24h\""),
    _unused("prompt_cache_options", _H, "cache breakpoint options: no effect on the output",
            lambda v, doc: isinstance(v, dict), {"type": ["object", "null"]}, "must be an object"),
    # -- OpenAI, embeddings --------------------------------------------------------------------------
    _impl("input", _E, "a string, strings, token ids or lists of token ids; at most 2048 inputs"),
    _impl("encoding_format", _E, "float or base64 (little-endian float32)"),
    _impl("dimensions", _E, "must equal the model's size (no truncation)"),
    # -- vLLM's extras -------------------------------------------------------------------------------
    _impl("top_k", _G, "0 or -1: off", "vLLM"),
    _impl("min_p", _G, "in [0, 1], relative to the most likely token", "vLLM"),
    _impl("repetition_penalty", _G, "in (0, 10], over prompt and output (Hugging Face's rule)", "vLLM"),
    _impl("ignore_eos", _G, "generate past the end-of-sequence token", "vLLM"),
    _impl("stop_token_ids", _G, "token ids that end a choice; outside the vocabulary -> 400", "vLLM"),
    _impl("priority", _G, "lower values start first (the waiting queue's order)", "vLLM"),
    _impl("structured_outputs", _G, "json, regex, choice, grammar or json_object: constrained decoding", "vLLM"),
    _impl("guided_json", _G, "older spelling of structured_outputs.json", "vLLM"),
    _impl("guided_regex", _G, "older spelling of structured_outputs.regex", "vLLM"),
    _impl("guided_choice", _G, "older spelling of structured_outputs.choice", "vLLM"),
    _impl("guided_grammar", _G, "older spelling of structured_outputs.grammar", "vLLM"),
    _refused("guided_decoding_backend", _G, "there is one grammar library (llguidance)", source="vLLM"),
    _refused("guided_whitespace_pattern", _G, "JSON whitespace is never free (an answer must be able to end)",
             source="vLLM"),
    _impl("chat_template_kwargs", _H, "extra variables for the chat template (e.g. enable_thinking)", "vLLM"),
    _refused("min_tokens", _G, "not implemented; only 0 is accepted", _only(0), _enum(0), "vLLM"),
    _impl("prompt_logprobs", _G, "0 to 20: the prompt tokens' logprobs, rank and that many alternatives, in "
          "vLLM's shape (choices[i].prompt_logprobs; chat: top-level); a scored prompt reuses cached blocks other scored prompts computed", "vLLM"),
    _refused("use_beam_search", _G, "beam search is not implemented; only false is accepted",
             _only(False), _enum(False), "vLLM"),
    _refused("allowed_token_ids", _G, "not implemented (logit_bias of -100 bans tokens)", source="vLLM"),
    _refused("bad_words", _G, "not implemented (logit_bias of -100 bans tokens)", source="vLLM"),
    _refused("skip_special_tokens", _G, "special tokens are always left out of the text; only true is "
             "accepted", _only(True), _enum(True), "vLLM"),
    _refused("include_stop_str_in_output", _G, "the stop text is never returned; only false is accepted",
             _only(False), _enum(False), "vLLM"),
    _refused("truncate_prompt_tokens", (*_G, *_E), "prompts are never truncated (too long -> 400)",
             source="vLLM"),
    _refused("chat_template", _H, "the model's own chat template is always used", source="vLLM"),
    _refused("add_generation_prompt", _H, "the generation prompt is always added; only true is accepted",
             _only(True), _enum(True), "vLLM"),
    _refused("continue_final_message", _H, "not implemented; only false is accepted", _only(False),
             _enum(False), "vLLM"),
)

# sub-fields of stream_options: implemented, or taken without effect; others -> 400
STREAM_OPTIONS = {"include_usage": "implemented", "continuous_usage_stats": "implemented (vLLM's extra)",
                  "include_obfuscation": "taken: rtserve sends no padding"}
_BY_ENDPOINT = {e: {f.name: f for f in FIELDS if e in f.endpoints} for e in PATHS}
_TEXT_ONLY = {"image_url", "input_audio", "file"}


def fields(endpoint: str) -> dict[str, Field]:
    """The fields ``endpoint`` (COMPLETIONS, CHAT or EMBEDDINGS) knows, by name."""
    return _BY_ENDPOINT[endpoint]


def check(doc: dict, endpoint: str) -> None:
    """Raise OpenAIError (400, ``param`` the field) for a field ``endpoint`` does not know, a
    refused value, and (chat) a content part this text model cannot take."""
    from .openai import OpenAIError  # here: openai.py imports this module

    table = _BY_ENDPOINT[endpoint]
    for name, value in doc.items():
        f = table.get(name)
        if f is None:
            raise OpenAIError(_unknown(name, endpoint), param=name)
        if name == "stream_options" and isinstance(value, dict):
            extra = next((k for k in value if k not in STREAM_OPTIONS), None)
            if extra is not None:
                raise OpenAIError(f"'stream_options.{extra}' is not supported: stream_options takes "
                                  f"{', '.join(STREAM_OPTIONS)}", param="stream_options")
            if value and dict.get(doc, "stream") is not True:  # as OpenAI and vLLM: it would do nothing
                raise OpenAIError("'stream_options' is only taken with 'stream': true", param="stream_options")
        if name == "messages" and endpoint == CHAT:
            _check_parts(value, OpenAIError)
        if value is None or f.status is Status.IMPLEMENTED:
            continue
        if f.accepts is None or not f.accepts(value, doc):
            raise OpenAIError(f.message, param=name)


def _unknown(name: str, endpoint: str) -> str:
    elsewhere = [PATHS[e] for e, t in _BY_ENDPOINT.items() if name in t]
    if elsewhere:
        return f"'{name}' is a field of {' and '.join(elsewhere)}, not of {PATHS[endpoint]}"
    return f"unknown field '{name}': {PATHS[endpoint]} does not take it (rtserve refuses fields it would ignore)"


def _check_parts(messages, error) -> None:
    """Content parts: text ones are joined by the parser; anything else would be dropped, so: a 400."""
    if not isinstance(messages, list):
        return  # the parser's message
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        if not isinstance(parts, list):
            continue
        for j, p in enumerate(parts):
            kind = p.get("type") if isinstance(p, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind in _TEXT_ONLY:
                raise error(f"{where} is an '{kind}' part: this model takes text only", param="messages")
            if kind == "refusal":
                raise error(f"{where} is a 'refusal' part: give an earlier refusal as a text part",
                            param="messages")
            if kind != "text":
                raise error(f"{where}: unknown content part type {kind!r} (this model takes 'text' parts)",
                            param="messages")


def complete_schema(schema: dict, endpoint: str) -> dict:
    """``schema`` (an object schema of /openapi.json) with every field of the table: the ones it
    lacks get the table's schema (implemented elsewhere: any value), and no other field is taken."""
    props = dict(schema.get("properties", {}))
    for name, f in _BY_ENDPOINT[endpoint].items():
        props.setdefault(name, {**(f.schema or {}), "description": f"{f.status.value}: {f.note}"})
    out = {**schema, "properties": props, "additionalProperties": False}
    if "stream_options" in props:  # a non-empty stream_options needs stream: true
        out["if"] = {"required": ["stream_options"],
                     "properties": {"stream_options": {"type": "object", "minProperties": 1}}}
        out["then"] = {"required": ["stream"], "properties": {"stream": {"const": True}}}
    return out


def markdown_table() -> str:
    """The README's "OpenAI API parameters" table."""
    rows = ["| Field | Endpoints | Status | What rtserve does |", "|---|---|---|---|"]
    order = {COMPLETIONS: 0, CHAT: 1, EMBEDDINGS: 2}
    for f in sorted(FIELDS, key=lambda f: (f.source != "OpenAI", min(order[e] for e in f.endpoints), f.name)):
        ends = ", ".join(sorted(f.endpoints, key=order.get))
        name = f"`{f.name}`" + (" (vLLM)" if f.source != "OpenAI" else "")
        rows.append(f"| {name} | {ends} | {f.status.value} | {f.note.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # the README's table: python -m rtserve.server.protocols.openai_fields
    print(markdown_table(), end="")
