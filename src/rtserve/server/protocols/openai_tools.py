"""Tool calling in OpenAI's chat API, request side: ``tools``, ``tool_choice``,
``parallel_tool_calls`` (and their deprecated spellings ``functions`` / ``function_call``, mapped to
them), assistant ``tool_calls`` and ``tool`` messages for the chat template, ``chat_template_kwargs``,
and the JSON schema a forced call (``required`` or a named function) is decoded under. Every bad
shape is a 400 naming the field. The answer side is ``server/chat_output.py``."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ...llm.structured.spec import StructuredSpec
from .openai import OpenAIError

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: render variables of the chat template a request cannot override through chat_template_kwargs
RESERVED_TEMPLATE_VARS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                          "raise_exception", "strftime_now", "range", "dict", "namespace", "lipsum", "cycler",
                          "joiner")


@dataclass(frozen=True)
class ToolRequest:
    """``choice``: none | auto | required | function (then ``function`` names it). ``legacy``: asked
    with ``functions``/``function_call``, answered with ``message.function_call``."""

    tools: list[dict]  # [{"type": "function", "function": {"name", "description"?, "parameters"?}}]
    choice: str = "none"
    function: str | None = None
    parallel: bool = True
    legacy: bool = False

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def parsed(self) -> bool:
        """Whether the model's own tool-call syntax is parsed out of its output."""
        return self.choice == "auto"

    def schema(self) -> dict:
        """What a forced call's output must match: the named function's arguments object, or for
        ``required`` an array of ``{"name", "parameters"}`` (vLLM's shape)."""
        params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}
        if self.choice == "function":
            return params[self.function]
        alternatives = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                          "parameters": p},
                         "required": ["name", "parameters"], "additionalProperties": False}
                        for name, p in params.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def structured(self) -> StructuredSpec | None:
        if not self.forced:
            return None
        text = json.dumps(self.schema(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return StructuredSpec("json_schema", text, param="tool_choice")


def _fail(message: str, param: str):
    raise OpenAIError(message, param=param)


def _function(f, where: str, param: str) -> dict:
    if not isinstance(f, dict):
        _fail(f"{where} must be an object", param)
    unknown = sorted(set(f) - {"name", "description", "parameters", "strict"})
    if unknown:
        _fail(f"{where}: unknown field '{unknown[0]}'", param)
    name = f.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(f"{where}.name must be 1 to 64 letters, digits, '_', '-', '.' or ':', got {name!r}", param)
    if not isinstance(f.get("description", ""), str):
        _fail(f"{where}.description must be a string", param)
    if not isinstance(f.get("strict", False), bool):
        _fail(f"{where}.strict must be a boolean", param)
    params = f.get("parameters")
    if params is not None:
        _check_schema(params, f"{where}.parameters", param)
    return {k: v for k, v in f.items() if v is not None}


def _check_schema(schema, where: str, param: str) -> None:
    if not isinstance(schema, dict):
        _fail(f"{where} must be a JSON schema object", param)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        path = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in e.path)
        _fail(f"{where}{path} is not a valid JSON schema: {e.message}", param)
    if schema.get("type", "object") != "object":
        _fail(f"{where} must describe an object (type 'object'), got type {schema.get('type')!r}", param)


def _tools(doc: dict) -> tuple[list[dict], bool]:
    """``tools``, or ``functions`` mapped to them; (tools, legacy)."""
    if doc.get("functions") is not None:
        if doc.get("tools") is not None:
            _fail("give 'tools' or the deprecated 'functions', not both", "functions")
        fs = doc["functions"]
        if not isinstance(fs, list) or not fs:
            _fail("'functions' must be a non-empty list of functions", "functions")
        return [{"type": "function", "function": _function(f, f"functions[{i}]", "functions")}
                for i, f in enumerate(fs)], True
    tools = doc.get("tools")
    if tools is None:
        return [], False
    if not isinstance(tools, list):
        _fail("'tools' must be a list of tools", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            _fail(f"tools[{i}] must be an object with type 'function' (the only tool type)", "tools")
        if "function" not in t:
            _fail(f"tools[{i}].function is required", "tools")
        out.append({"type": "function", "function": _function(t["function"], f"tools[{i}].function", "tools")})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        _fail(f"tools: the function name '{dup}' is given twice", "tools")
    return out, False


def _choice(doc: dict, names: list[str], legacy: bool) -> tuple[str, str | None]:
    key = "function_call" if legacy or doc.get("function_call") is not None else "tool_choice"
    if key == "function_call" and doc.get("tool_choice") is not None:
        _fail("give 'tool_choice' or the deprecated 'function_call', not both", "function_call")
    c = doc.get(key)
    if c is None:
        return ("auto" if names else "none"), None
    if isinstance(c, str):
        if c not in ("none", "auto", "required") or (legacy and c == "required"):
            _fail(f"'{key}' must be 'none', 'auto'{'' if legacy else ', required'} or a function, got {c!r}", key)
        if c != "none" and not names:
            _fail(f"'{key}' is '{c}' but no tools are given", key)
        return c, None
    name = c.get("name") if legacy and isinstance(c, dict) else None
    if not legacy and isinstance(c, dict) and c.get("type") == "function" and isinstance(c.get("function"), dict):
        name = c["function"].get("name")
    if not isinstance(name, str):
        _fail(f"'{key}' must be 'none', 'auto', 'required' or "
              + ('{"name": ...}' if legacy else '{"type": "function", "function": {"name": ...}}'), key)
    if name not in names:
        _fail(f"'{key}' names the function '{name}', which is not among the tools given"
              f" ({', '.join(names) or 'none'})", key)
    return "function", name


def parse_tools(doc: dict) -> ToolRequest:
    """The request's tool fields, validated (400 naming the field)."""
    tools, legacy = _tools(doc)
    legacy = legacy or doc.get("function_call") is not None
    choice, function = _choice(doc, [t["function"]["name"] for t in tools], legacy)
    parallel = doc.get("parallel_tool_calls")
    parallel = True if parallel is None else parallel  # null is the same as absent
    if not isinstance(parallel, bool):
        _fail("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return ToolRequest(tools, choice, function, parallel and not legacy, legacy)


def template_kwargs(doc: dict) -> dict:
    """``chat_template_kwargs``: extra variables for the chat template (e.g. Qwen3's ``enable_thinking``)."""
    kw = doc.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kw):
        _fail("'chat_template_kwargs' must be an object whose keys are names", "chat_template_kwargs")
    taken = sorted(set(kw) & set(RESERVED_TEMPLATE_VARS))
    if taken:
        _fail(f"chat_template_kwargs cannot set '{taken[0]}' (the request sets it)", "chat_template_kwargs")
    return kw


def chat_message(messages: list[dict], i: int) -> dict:
    """``messages[i]`` for the chat template: an assistant message's ``tool_calls`` checked, with
    ``function.arguments`` given as JSON text passed as the object it spells (Hugging Face templates
    expect a mapping there; vLLM does the same); a ``tool`` message needs its ``tool_call_id``. The
    deprecated ``function_call`` / ``function`` messages become ``tool_calls`` / ``tool`` ones."""
    m, where = messages[i], f"messages[{i}]"
    if m["role"] == "assistant" and m.get("function_call") is not None:
        m = {k: v for k, v in m.items() if k != "function_call"}
        m["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": messages[i]["function_call"]}]
        where += ".function_call"
    elif m["role"] == "function":
        j = next((j for j in range(i - 1, -1, -1) if messages[j].get("role") == "assistant"
                  and (messages[j].get("function_call") or messages[j].get("tool_calls"))), None)
        m = {**m, "role": "tool", "tool_call_id": f"call_{j}" if j is not None else "call_none"}
    if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
        _fail(f"{where}: a 'tool' message needs 'tool_call_id' (a string)", "messages")
    calls = m.get("tool_calls")
    if calls is None:
        return m
    if m["role"] != "assistant" or not isinstance(calls, list):
        _fail(f"{where}.tool_calls must be a list, on an assistant message", "messages")
    return {**m, "tool_calls": [_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]}


def _call(c, where: str) -> dict:
    if not isinstance(c, dict) or c.get("type", "function") != "function" or not isinstance(c.get("function"), dict):
        _fail(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", "messages")
    f = c["function"]
    if not isinstance(f.get("name"), str):
        _fail(f"{where}.function.name must be a string", "messages")
    args = f.get("arguments", "{}")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
            args = parsed if isinstance(parsed, dict) else args
        except ValueError:
            pass  # not JSON: the template gets the text as it is
    elif not isinstance(args, dict):
        _fail(f"{where}.function.arguments must be a string (JSON text) or an object", "messages")
    if not isinstance(c.get("id", ""), str):
        _fail(f"{where}.id must be a string", "messages")
    return {**c, "type": "function", "function": {**f, "arguments": args}}
