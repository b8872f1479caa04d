"""The contract of a tool-call parser: a model's own tool-call syntax (``<tool_call>{...}</tool_call>``,
``[TOOL_CALLS][...]``, ...) turned into content and calls, for a whole output and for a stream.

A parser implements one method, :meth:`ToolParser.scan`; extraction and streaming are built on it
here, so every format streams the same way: content is shown as soon as it cannot be the start of a
call marker, a call's name as soon as it is known, then its arguments as the model writes them (the
model's own JSON text when it writes the arguments right after the name; otherwise all at once when
the call is complete). Parsers know nothing of the API (call ids, chunks): ``server/chat_output.py``
does that. A call begun and never finished (the output was cut) keeps what was sent of it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as JSON text


@dataclass
class Extracted:
    """A whole output: ``content`` is the text outside the calls (stripped, None when empty) when
    there are calls, else the text as it was."""

    content: str | None
    calls: list[ToolCall]


@dataclass
class Scan:
    """What a prefix of the output holds so far. ``content`` only grows as the text grows (a text
    that may yet become a marker is held back); ``calls`` are the complete calls, in order;
    ``pending_name`` is the name of the call being written, once it is known, and
    ``pending_arguments`` the text of its arguments object so far, when that text will be the
    start of its ``arguments`` (the model's own JSON text, as written)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    pending_name: str | None = None
    pending_arguments: str = ""


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call: ``name`` is set on the call's first piece."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamStep:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class ToolParser:
    """Base class of the tool-call formats (one module each, registered in ``TOOL_PARSERS``).

    Class attributes:
        name: the ``tool_parser:`` value in model.yaml.
        markers: the texts that open a call; tokens spelling them must survive detokenizing (the
            engine keeps these special tokens in the output text).
        template_signs: a chat template containing one of these is taken to use this format.
    """

    name = ""
    markers: tuple[str, ...] = ()
    template_signs: tuple[str, ...] = ()

    def scan(self, text: str, final: bool) -> Scan:
        """Split ``text`` (the output so far; all of it when ``final``) into content and calls.

        Must hold: for a prefix ``a`` of ``b``, ``scan(a, False).content`` is a prefix of
        ``scan(b, f).content`` and ``scan(a, False).calls`` a prefix of ``scan(b, f).calls``. When
        ``final``, text that did not turn out to be a call is content.
        """
        raise NotImplementedError

    def extract(self, text: str) -> Extracted:
        s = self.scan(text, final=True)
        if not s.calls:
            return Extracted(text, [])
        return Extracted(s.content.strip() or None, s.calls)

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self)


class ToolCallStream:
    """Text deltas in, content and call deltas out: a call's name first, then pieces of its
    arguments as they are written. Trailing whitespace of the content waits for more text (it is
    dropped when the output ends in calls)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser, self.text = parser, ""
        self.num_content = self.num_calls = 0
        self.named = -1  # index of the last call whose name was sent
        self.args_sent = ""  # the arguments sent so far of the call being written

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def feed(self, delta: str) -> StreamStep:
        self.text += delta
        return self._step(self.parser.scan(self.text, final=False), final=False)

    def finish(self) -> StreamStep:
        return self._step(self.parser.scan(self.text, final=True), final=True)

    def _step(self, s: Scan, final: bool) -> StreamStep:
        target = s.content if final and not s.calls else s.content.rstrip()
        out = StreamStep(content=target[self.num_content:] if len(target) > self.num_content else "")
        self.num_content = max(self.num_content, len(target))
        for i in range(self.num_calls, len(s.calls)):
            c = s.calls[i]
            sent = self.args_sent if self.named == i and c.arguments.startswith(self.args_sent) else ""
            out.calls.append(ToolCallDelta(i, None if self.named == i else c.name, c.arguments[len(sent):]))
            self.named, self.args_sent = i, ""
        self.num_calls = len(s.calls)
        if s.pending_name is None:
            return out
        if self.named < self.num_calls:
            out.calls.append(ToolCallDelta(self.num_calls, s.pending_name, s.pending_arguments))
            self.named, self.args_sent = self.num_calls, s.pending_arguments
        elif len(s.pending_arguments) > len(self.args_sent) and s.pending_arguments.startswith(self.args_sent):
            out.calls.append(ToolCallDelta(self.num_calls, None, s.pending_arguments[len(self.args_sent):]))
            self.args_sent = s.pending_arguments
        return out


# -- helpers for the formats ---------------------------------------------------------------------
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_DECODER = json.JSONDecoder()


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def pending_call(s: Scan, partial: str) -> Scan:
    """``s`` with the name of the call object being written in ``partial``, once its
    ``"name": "..."`` is complete and first, and the text of its arguments object so far."""
    partial = partial.lstrip()
    m = _NAME.match(partial)
    if m is None:
        return s
    try:
        s.pending_name = json.loads(f'"{m.group(1)}"')
    except ValueError:
        return s
    a = _ARGS.match(partial, m.end())
    if a is not None and partial[a.end():a.end() + 1] == "{":
        s.pending_arguments = complete_prefix(partial[a.end():])
    return s


def complete_prefix(text: str) -> str:
    """``text`` (the start of a JSON object) up to the object's end when it is complete."""
    try:
        return text[:_DECODER.raw_decode(text)[1]]
    except ValueError:
        return text


def _raw_arguments(raw: str, args: dict) -> str | None:
    """The arguments object's text as written in ``raw`` (a call object's text), when the name
    comes first and the arguments next; None otherwise."""
    raw = raw.lstrip()
    m = _NAME.match(raw)
    a = _ARGS.match(raw, m.end()) if m is not None else None
    if a is None:
        return None
    try:
        v, end = _DECODER.raw_decode(raw, a.end())
    except ValueError:
        return None
    return raw[a.end():end] if v == args else None


def as_call(obj, raw: str | None = None, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """``{"name": str, "arguments"|"parameters": object}`` as a call; None when ``obj`` is not one.
    The arguments are the model's own text when ``raw`` (the object's text) holds them as an object
    after the name (so they stream as written), else ``obj``'s arguments as JSON text."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    text = _raw_arguments(raw, args) if raw is not None else None
    return ToolCall(obj["name"], text if text is not None else json.dumps(args, ensure_ascii=False))


def json_values(text: str, pos: int, separators: str) -> tuple[list[tuple[object, int, int]], int, bool]:
    """Decode JSON values from ``text[pos:]``, skipping whitespace and ``separators`` between them.
    Returns ((value, where it starts, where it ends) ..., where decoding stopped, whether only
    whitespace and separators follow the last value)."""
    values = []
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return values, pos, True
        try:
            v, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            return values, pos, False
        values.append((v, pos, end))
        pos = end


def array_calls(s: Scan, body: str, at: int, final: bool) -> Scan:
    """Add to ``s`` the calls of a JSON array of call objects whose items start at ``body[at:]``
    (what follows the calls, or all of ``body`` when there are none, is content at the end)."""
    values, stop, clean = json_values(body, at, ",")
    end = at
    for v, v_at, v_end in values:
        call = as_call(v, body[v_at:v_end])
        if call is None:
            break
        s.calls.append(call)
        end = v_end
    if final:
        rest = body[end:].strip()
        if rest not in ("", "]"):
            s.content += rest.removeprefix("]") if s.calls else body
    elif len(s.calls) == len(values) and not clean:
        pending_call(s, body[stop:])
    return s
