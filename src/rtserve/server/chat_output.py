"""A chat choice's output text read into the answer's parts: ``reasoning_content`` (the reasoning
parser), ``content`` and ``tool_calls`` (the model's tool parser under ``tool_choice: "auto"``, the
constrained JSON under ``"required"`` or a named function), with OpenAI's ``finish_reason``
``tool_calls``; whole (``ChatOutput.message``) or streamed (``ChoiceStream``, OpenAI's
``delta.tool_calls`` items: index, id, type and name first, then argument fragments)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..llm.reasoning import ReasoningParser, reasoning_parser
from ..llm.tool_parsers import ToolCall, ToolParser, tool_parser
from ..llm.tool_parsers.base import StreamStep
from ..llm.tool_parsers.forced import JsonArrayToolParser
from .protocols.openai import GenerationRequest, OpenAIError
from .protocols.openai_tools import ToolRequest


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@dataclass(frozen=True)
class ChatOutput:
    """How one request's outputs are read. ``tools`` None (or choice none): no tool calls."""

    reasoning: ReasoningParser | None
    parser: ToolParser | None  # the model's syntax (auto) or the forced array (required)
    tools: ToolRequest | None

    @property
    def named(self) -> str | None:
        return self.tools.function if self.tools is not None and self.tools.choice == "function" else None

    def finish_reason(self, called: bool, reason: str | None) -> str | None:
        """``tool_calls`` (``function_call`` for the deprecated API) when calls were made and the
        output ended by itself; a cut output keeps ``length``."""
        if called and reason == "stop":
            return "function_call" if self.tools.legacy else "tool_calls"
        return reason

    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """A whole choice's message and finish reason."""
        reasoning, content, calls = None, text, []
        if self.named is not None:
            if reason == "stop" and _is_object(text):
                content, calls = None, [ToolCall(self.named, text.strip())]
        else:
            if self.reasoning is not None:
                reasoning, content = self.reasoning.extract(text)
            if self.parser is not None and content is not None:
                got = self.parser.extract(content)
                content, calls = got.content, got.calls
        if self.tools is not None and not self.tools.parallel:
            calls = calls[:1]
        msg: dict = {"role": "assistant", "content": content}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if calls and self.tools.legacy:
            msg["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        elif calls:
            msg["tool_calls"] = [{"id": call_id(), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return msg, self.finish_reason(bool(calls), reason)

    def stream(self) -> "ChoiceStream":
        return ChoiceStream(self)


def for_request(req: GenerationRequest, model) -> ChatOutput | None:
    """The reading of ``req``'s outputs on ``model`` (its ``tool_parser`` / ``reasoning_parser``
    names), or None when the text is the answer as it is. Tools under ``auto`` on a model with no
    tool-call format are a 400, never silently ignored."""
    if not hasattr(model, "tool_parser"):
        return None  # not a language model: its open_stream says which API it takes
    tools = req.tools
    reasoning = model.reasoning_parser
    if tools is not None and tools.parsed:
        name = model.tool_parser
        if name is None:
            raise OpenAIError(f"model '{req.model}' has no tool-call format (no tool_parser in its model.yaml and "
                              "none recognized in its chat template), so it cannot choose to call tools: use "
                              "tool_choice 'required' or a named function, or 'none'", param="tools")
        parser = tool_parser(name)
    elif tools is not None and tools.choice == "required":
        parser = JsonArrayToolParser()
    else:
        parser = None
    if tools is not None and tools.forced:
        reasoning = None  # the constraint holds from the first token: there is no reasoning to split
    if parser is None and reasoning is None and (tools is None or not tools.forced):
        return None
    return ChatOutput(reasoning_parser(reasoning) if reasoning else None, parser,
                      tools if tools is not None and tools.choice != "none" else None)


class ChoiceStream:
    """One streamed choice: text deltas in, chat ``delta`` objects out."""

    def __init__(self, out: ChatOutput) -> None:
        self.out = out
        self.reasoning = out.reasoning.stream() if out.reasoning is not None else None
        self.calls = out.parser.stream() if out.parser is not None else None
        self.ids: list[str] = []
        self.text = ""  # a named call's arguments so far

    def feed(self, text: str) -> dict:
        if self.out.named is not None:
            return self._named(text)
        reasoning = ""
        if self.reasoning is not None:
            r = self.reasoning.feed(text)
            reasoning, text = r.reasoning, r.content
        step = self.calls.feed(text) if self.calls is not None else StreamStep(content=text)
        return self._delta(reasoning, step)

    def finish(self, reason: str | None) -> tuple[dict, str | None]:
        """The last delta of the choice and its finish reason."""
        if self.out.named is not None:
            return {}, self.out.finish_reason(bool(self.ids) and reason == "stop" and _is_object(self.text), reason)
        reasoning, step = "", StreamStep()
        if self.reasoning is not None:
            r = self.reasoning.finish()
            reasoning = r.reasoning
            step = self.calls.feed(r.content) if self.calls is not None else StreamStep(content=r.content)
        if self.calls is not None:
            last = self.calls.finish()
            step = StreamStep(step.content + last.content, step.calls + last.calls)
        called = self.calls is not None and self.calls.called  # complete calls (a begun one may be cut)
        return self._delta(reasoning, step), self.out.finish_reason(called, reason)

    def _named(self, text: str) -> dict:
        self.text += text
        if not self.ids:
            return self._calls([(0, self.out.named, text)])
        return self._calls([(0, None, text)]) if text else {}

    def _delta(self, reasoning: str, step: StreamStep) -> dict:
        limit = 1 if self.out.tools is not None and not self.out.tools.parallel else None
        delta = self._calls([(d.index, d.name, d.arguments) for d in step.calls
                             if limit is None or d.index < limit])
        if reasoning:
            delta["reasoning_content"] = reasoning
        if step.content:
            delta["content"] = step.content
        return delta

    def _calls(self, parts: list[tuple[int, str | None, str]]) -> dict:
        items = []
        for index, name, args in parts:
            if name is not None:
                self.ids.append(call_id())
                items.append({"index": index, "id": self.ids[index], "type": "function",
                              "function": {"name": name, "arguments": args}})
            else:
                items.append({"index": index, "function": {"arguments": args}})
        if not items:
            return {}
        if self.out.tools.legacy:  # one call at most: its function_call pieces
            return {"function_call": {k: v for k, v in items[0]["function"].items()}}
        return {"tool_calls": items}
