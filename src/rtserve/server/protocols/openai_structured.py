"""The structured-output fields of an OpenAI request, into the engine's one ``StructuredSpec``.

Accepted, one per request: OpenAI's ``response_format`` (``text`` = no constraint, ``json_object``,
``json_schema``), vLLM's ``structured_outputs`` (``json`` | ``regex`` | ``choice`` | ``grammar`` |
``json_object``) and its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar``. A malformed one, or two at once, is a 400 naming the field. Whether a schema,
regex or grammar is valid is checked later, by compiling it (``LLM.compile_structured``).
"""
from __future__ import annotations

import json

from ...llm.structured import StructuredSpec
from .openai import OpenAIError

GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                      "json_object": "json_object"}
JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")
#: vLLM options with no meaning here (whitespace is never free; there is one grammar library)
REFUSED = ("guided_whitespace_pattern", "guided_decoding_backend")


def parse_structured(doc: dict) -> StructuredSpec | None:
    """The request's constraint, or None. Raises OpenAIError (400, ``param`` = the field)."""
    for key in REFUSED:
        if doc.get(key) is not None:
            raise OpenAIError(f"'{key}' is not supported (JSON is generated without free whitespace, by "
                              "llguidance)", param=key)
    found: list[tuple[str, StructuredSpec]] = []  # (top-level field, its spec)
    if doc.get("response_format") is not None:
        spec = _response_format(doc["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    if doc.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(doc["structured_outputs"])))
    for key, kind in GUIDED.items():
        if doc.get(key) is not None:
            found.append((key, _value(kind, doc[key], key)))
    if len(found) > 1:
        (first, _), (second, _) = found[:2]
        raise OpenAIError(f"'{second}' and '{first}' both constrain the output; give one", param=second)
    return found[0][1] if found else None


def _response_format(rf) -> StructuredSpec | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise OpenAIError("'response_format' must be an object with a 'type'", param="response_format")
    kind = rf["type"]
    extra = sorted(set(rf) - {"type", kind})
    if kind not in ("text", "json_object", "json_schema"):
        raise OpenAIError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got '{kind}'",
                          param="response_format.type")
    if extra or (kind != "json_schema" and kind in rf):
        bad = extra[0] if extra else kind
        raise OpenAIError(f"response_format.{bad} is not a field of a '{kind}' response format",
                          param=f"response_format.{bad}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object", param="response_format")
    js = rf.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(js, dict):
        raise OpenAIError(f"'{where}' must be an object with 'name' and 'schema'", param=where)
    unknown = sorted(set(js) - set(JSON_SCHEMA_KEYS))
    if unknown:
        raise OpenAIError(f"{where}.{unknown[0]} is not supported; fields: {', '.join(JSON_SCHEMA_KEYS)}",
                          param=f"{where}.{unknown[0]}")
    name = js.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise OpenAIError(f"{where}.name must be a string of 1 to 64 characters", param=f"{where}.name")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise OpenAIError(f"{where}.strict must be a boolean", param=f"{where}.strict")
    if js.get("description") is not None and not isinstance(js["description"], str):
        raise OpenAIError(f"{where}.description must be a string", param=f"{where}.description")
    # strict true or false: the schema is always enforced (false asks for less than is given)
    return _value("json_schema", js.get("schema"), f"{where}.schema", text_ok=False)


def _structured_outputs(so) -> StructuredSpec:
    if not isinstance(so, dict):
        raise OpenAIError("'structured_outputs' must be an object", param="structured_outputs")
    given = [k for k, v in so.items() if v is not None]
    unknown = [k for k in given if k not in STRUCTURED_OUTPUTS]
    if unknown:
        raise OpenAIError(f"structured_outputs.{unknown[0]} is not supported; one of: "
                          f"{', '.join(STRUCTURED_OUTPUTS)}", param=f"structured_outputs.{unknown[0]}")
    if len(given) != 1:
        raise OpenAIError(f"'structured_outputs' must set exactly one of {', '.join(STRUCTURED_OUTPUTS)}"
                          + (f", got {', '.join(given)}" if given else ""), param="structured_outputs")
    key = given[0]
    return _value(STRUCTURED_OUTPUTS[key], so[key], f"structured_outputs.{key}")


def _value(kind: str, v, param: str, text_ok: bool = True) -> StructuredSpec:
    """A spec of ``kind`` from a field's value, its shape checked."""
    if kind == "json_object":
        if v is not True:
            raise OpenAIError(f"'{param}' must be true", param=param)
        return StructuredSpec("json_object", param=param)
    if kind == "json_schema":
        if isinstance(v, str) and text_ok:
            try:
                v = json.loads(v)
            except ValueError as e:
                raise OpenAIError(f"'{param}' is not valid JSON: {e}", param=param) from None
        if not isinstance(v, dict):
            raise OpenAIError(f"'{param}' must be a JSON schema (an object)", param=param)
        # key order kept: properties are generated in the schema's order
        return StructuredSpec("json_schema", json.dumps(v, separators=(",", ":"), ensure_ascii=False), param)
    if kind == "choice":
        if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
            raise OpenAIError(f"'{param}' must be a non-empty list of non-empty strings", param=param)
        return StructuredSpec("choice", json.dumps(v, ensure_ascii=False), param)
    if not isinstance(v, str) or not v.strip():
        raise OpenAIError(f"'{param}' must be a non-empty string", param=param)
    return StructuredSpec(kind, v, param)
