"""Reasoning parsers: a reasoning model's ``<think>...</think>`` split from its answer, for a whole
output and for a stream (vLLM's ``reasoning_content``). ``REASONING_PARSERS`` maps the
``reasoning_parser:`` names of model.yaml to them; :func:`detect_reasoning_parser` picks one from
a chat template. Tool-call parsing applies to the content, after the reasoning."""
from __future__ import annotations

from dataclasses import dataclass

from .tool_parsers.base import held_back

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str
    content: str


class ReasoningParser:
    """``<think>`` reasoning ``</think>`` content. ``implicit_start``: the output is reasoning from
    its first token even without ``<think>`` (the chat template put it in the prompt: DeepSeek-R1,
    QwQ); otherwise an output that does not open with ``<think>`` is all content (Qwen3, whose
    template may switch thinking off with ``enable_thinking``). Reasoning that never ends (the
    output was cut) is all reasoning."""

    name = ""
    implicit_start = False
    markers = (START, END)

    def split(self, text: str, final: bool) -> ReasoningSplit:
        """Reasoning and content of the output so far; both only grow as ``text`` grows (a text
        that may yet be a marker is held back unless ``final``)."""
        lead = len(text) - len(text.lstrip())
        head = text[lead:]
        if head.startswith(START):
            at = lead + len(START)
        elif not final and START.startswith(head):
            return ReasoningSplit("", "")  # may yet open with <think>
        elif self.implicit_start:
            at = 0
        else:
            return ReasoningSplit("", text)
        j = text.find(END, at)
        if j < 0:
            body = text[at:]
            return ReasoningSplit(body if final else body[:len(body) - held_back(body, (END,))], "")
        return ReasoningSplit(text[at:j], text[j + len(END):].lstrip())

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part."""
        s = self.split(text, final=True)
        return s.reasoning or None, s.content or None

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self)


class ReasoningStream:
    """Text deltas in, (reasoning delta, content delta) out."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser, self.text = parser, ""
        self.num_reasoning = self.num_content = 0

    def feed(self, delta: str) -> ReasoningSplit:
        self.text += delta
        return self._step(self.parser.split(self.text, final=False))

    def finish(self) -> ReasoningSplit:
        return self._step(self.parser.split(self.text, final=True))

    def _step(self, s: ReasoningSplit) -> ReasoningSplit:
        out = ReasoningSplit(s.reasoning[self.num_reasoning:], s.content[self.num_content:])
        self.num_reasoning = max(self.num_reasoning, len(s.reasoning))
        self.num_content = max(self.num_content, len(s.content))
        return out


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    implicit_start = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    c.name: c for c in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


def reasoning_parser(name: str) -> ReasoningParser:
    """The parser registered as ``name``; ValueError naming the known ones."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]()


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """``qwen3`` for a template with an ``enable_thinking`` switch, ``deepseek_r1`` for one that
    otherwise mentions ``<think>``/``</think>``; None for the rest."""
    if not chat_template:
        return None
    if "enable_thinking" in chat_template:
        return "qwen3"
    if START in chat_template or END in chat_template:
        return "deepseek_r1"
    return None
