"""Tool-call parsers, one module per model family's syntax; ``TOOL_PARSERS`` maps the
``tool_parser:`` names of model.yaml to them, :func:`detect_tool_parser` picks one from a chat
template. Contract: :class:`base.ToolParser`."""
from __future__ import annotations

from .base import Extracted, ToolCall, ToolCallDelta, ToolCallStream, ToolParser
from .hermes import HermesToolParser
from .llama3 import Llama3JsonToolParser
from .mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser]) -> type[ToolParser]:
    TOOL_PARSERS[cls.name] = cls
    return cls


for _cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser):
    register_tool_parser(_cls)


def tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ValueError naming the known ones."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The format a chat template writes tool calls in, by the markers it mentions (the most
    specific first: Mistral's, Llama's tag, then Hermes' block); None when it shows none."""
    if not chat_template:
        return None
    for name in ("mistral", "llama3_json", "hermes"):
        if any(sign in chat_template for sign in TOOL_PARSERS[name].template_signs):
            return name
    return None


__all__ = ["TOOL_PARSERS", "Extracted", "ToolCall", "ToolCallDelta", "ToolCallStream", "ToolParser",
           "detect_tool_parser", "register_tool_parser", "tool_parser"]
