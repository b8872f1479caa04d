"""The output of a ``tool_choice: "required"`` request, decoded under the JSON schema of
``ToolRequest.schema`` (server/protocols/openai_tools.py): ``[{"name": ..., "parameters": {...}}, ...]``.
Not a model's own syntax, so not in the ``tool_parser:`` registry."""
from __future__ import annotations

from .base import Scan, ToolParser, array_calls


class JsonArrayToolParser(ToolParser):
    name = "json_array"

    def scan(self, text: str, final: bool) -> Scan:
        at = len(text) - len(text.lstrip())
        if at == len(text) or text[at] != "[":
            return Scan(text if final else "")
        scan = array_calls(Scan(""), text, at + 1, final)
        if scan.calls:  # the rest of a forced array is a call cut short (finish_reason "length"), not content
            scan.content = ""
        return scan
