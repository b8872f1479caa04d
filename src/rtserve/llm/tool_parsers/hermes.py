"""Hermes, Qwen2.5 and Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
one block per call, text allowed around them. A block left open at the end of the output (the
model stopped before ``</tool_call>``) is still a call when its JSON is complete."""
from __future__ import annotations

import json

from .base import Scan, ToolParser, as_call, held_back, pending_call

START, END = "<tool_call>", "</tool_call>"


def _call(body: str):
    try:
        return as_call(json.loads(body), body)
    except ValueError:
        return None


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (START, END)
    template_signs = (START,)

    def scan(self, text: str, final: bool) -> Scan:
        s, pos = Scan(""), 0
        while True:
            i = text.find(START, pos)
            if i < 0:
                tail = text[pos:]
                s.content += tail if final else tail[:len(tail) - held_back(tail, (START,))]
                return s
            s.content += text[pos:i]
            body_at = i + len(START)
            j = text.find(END, body_at)
            if j < 0:  # the last block is still open
                if not final:
                    return pending_call(s, text[body_at:])
                call = _call(text[body_at:])
                if call is None:
                    s.content += text[i:]
                else:
                    s.calls.append(call)
                return s
            call = _call(text[body_at:j])
            if call is None:  # not a call after all: it is text
                s.content += text[i:j + len(END)]
            else:
                s.calls.append(call)
            pos = j + len(END)
