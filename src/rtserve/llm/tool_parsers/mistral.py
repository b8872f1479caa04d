"""Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3 tokenizers), or one
``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+). ``[TOOL_CALLS]`` is a special token: the engine
keeps it in the text for this parser. Text before the marker is content; after it, everything is
calls (what does not parse, at the end, is content)."""
from __future__ import annotations

from .base import Scan, ToolCall, ToolParser, array_calls, as_call, complete_prefix, held_back, json_values

TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (TAG, ARGS)
    template_signs = (TAG,)

    def scan(self, text: str, final: bool) -> Scan:
        i = text.find(TAG)
        if i < 0:
            return Scan(text if final else text[:len(text) - held_back(text, (TAG,))])
        s = Scan(text[:i])
        body = text[i + len(TAG):]
        if body.lstrip().startswith("["):
            return array_calls(s, body, body.index("[") + 1, final)
        parts = body.split(TAG)
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            name, sep, args = part.partition(ARGS)
            call, rest = _named(name.strip(), args) if sep else (None, "")
            if call is not None:
                s.calls.append(call)
                if final:
                    s.content += rest
            elif last and not final:
                if sep and name.strip():
                    s.pending_name = name.strip()
                    s.pending_arguments = complete_prefix(args.lstrip()) if args.lstrip().startswith("{") else ""
            elif final:
                s.content += part
        return s


def _named(name: str, args: str) -> tuple[ToolCall | None, str]:
    """The call ``name[ARGS]args`` once its arguments object is complete, and the text after it."""
    values, stop, _ = json_values(args, 0, "")
    if not name or not values:
        return None, ""
    v, at, end = values[0]
    call = as_call({"name": name, "arguments": v})
    return (ToolCall(name, args[at:end]) if call is not None else None), args[end:]
