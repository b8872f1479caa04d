"""Llama 3.x JSON tool calls: the output is ``{"name": ..., "parameters": {...}}`` (several separated
by ``;``), optionally after ``<|python_tag|>``. Output that does not start with ``{`` (or hold the
tag) is content; when the first complete object is not a call, all of it is content."""
from __future__ import annotations

from .base import Scan, ToolParser, as_call, held_back, json_values, pending_call

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = (TAG,)
    template_signs = (TAG,)

    def scan(self, text: str, final: bool) -> Scan:
        i = text.find(TAG)
        if i >= 0:
            prefix, at = text[:i], i + len(TAG)
        elif text.lstrip().startswith("{"):
            prefix, at = "", len(text) - len(text.lstrip())
        elif not text.strip() and not final:
            return Scan("")  # may yet start with "{"
        else:
            return Scan(text if final else text[:len(text) - held_back(text, (TAG,))])
        values, stop, clean = json_values(text, at, ";")
        calls, end = [], at
        for v, v_at, v_end in values:
            call = as_call(v, text[v_at:v_end])
            if call is None:
                break
            calls.append(call)
            end = v_end
        if not calls and (values or final):  # not a tool call: all of it is text
            return Scan(text)
        if len(calls) < len(values) or (final and not clean):  # calls, then text
            return Scan(prefix + text[end:] if final else prefix, calls)
        return Scan(prefix, calls) if final else pending_call(Scan(prefix, calls), text[stop:])
