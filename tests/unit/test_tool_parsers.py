"""Tool-call and reasoning parsers on canned model outputs: whole, and streamed split at every
point and one character at a time (the stream must add up to what the whole output gives)."""
from __future__ import annotations

import json

import pytest

from rtserve.llm.reasoning import detect_reasoning_parser, reasoning_parser
from rtserve.llm.tool_parsers import detect_tool_parser, tool_parser


def _streamed(parser, pieces):
    st, content, calls = parser.stream(), "", []
    for step in [st.feed(p) for p in pieces] + [st.finish()]:
        content += step.content
        for d in step.calls:
            if d.name is not None:
                assert d.index == len(calls), "a call's name comes once, in order"
                calls.append([d.name, ""])
            calls[d.index][1] += d.arguments
    return content, [tuple(c) for c in calls]


def _check(name, text, want_content, want_calls):
    parser = tool_parser(name)
    got = parser.extract(text)
    assert got.content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == want_calls
    splits = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        content, calls = _streamed(parser, pieces)
        if len(calls) == len(want_calls) + 1:
            calls.pop()  # a call begun (name, some arguments) when the output was cut: it stays unfinished
        assert [(n, json.loads(a)) for n, a in calls] == want_calls, pieces
        if want_calls:
            assert (content.strip() or None) == want_content, pieces
        else:
            assert content == text, pieces


W = {"city": "Paris", "days": 2}
HERMES = [
    ("Hello <b>world</b> < tool", "Hello <b>world</b> < tool", []),
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>', None,
     [("weather", W)]),
    ('Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
     '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>', "Let me check.", [("weather", W), ("time", {})]),
    ('<tool_call>{"name": "time", "arguments": {"tz": "UTC"}}', None, [("time", {"tz": "UTC"})]),  # left open
    ('a <tool_call>not json</tool_call> b', 'a <tool_call>not json</tool_call> b', []),
    ('ends with <tool_call', 'ends with <tool_call', []),
    ('<tool_call>{"name": "ü", "arguments": "{\\"x\\": 1}"}</tool_call>', None, [("ü", {"x": 1})]),
]
LLAMA3 = [
    ("The answer is {not json}.", "The answer is {not json}.", []),
    ('{"name": "weather", "parameters": {"city": "Paris", "days": 2}}', None, [("weather", W)]),
    ('  <|python_tag|>{"name": "weather", "parameters": {"city": "Paris", "days": 2}}; {"name": "time", '
     '"parameters": {}}', None, [("weather", W), ("time", {})]),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "time", "parameters": {}} and then', "and then", [("time", {})]),
    ('{"name": "time", "parameters": {', '{"name": "time", "parameters": {', []),  # cut: text
]
MISTRAL = [
    ("Plain [text] with [brackets]", "Plain [text] with [brackets]", []),
    ('[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "time", '
     '"arguments": {}}]', None, [("weather", W), ("time", {})]),
    ('Sure. [TOOL_CALLS]weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]time[ARGS]{}', "Sure.",
     [("weather", W), ("time", {})]),
]


def test_arguments_stream_as_they_are_written():
    text = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    st = tool_parser("hermes").stream()
    steps = [st.feed(c) for c in text] + [st.finish()]
    pieces = [d for s in steps for d in s.calls]
    assert pieces[0].name == "weather" and all(d.name is None for d in pieces[1:]) and len(pieces) > 10
    assert "".join(d.arguments for d in pieces) == '{"city": "Paris", "days": 2}'  # the model's own text


@pytest.mark.parametrize("name,cases", [("hermes", HERMES), ("llama3_json", LLAMA3), ("mistral", MISTRAL)])
def test_tool_parser_whole_and_streamed(name, cases):
    for text, content, calls in cases:
        _check(name, text, content, calls)


def test_detection_and_registry():
    assert detect_tool_parser("{{ '<tool_call>' }}") == "hermes"
    assert detect_tool_parser("<|python_tag|> ... <tool_call>") == "llama3_json"
    assert detect_tool_parser("[TOOL_CALLS]") == "mistral"
    assert detect_tool_parser("{{ m['content'] }}") is None and detect_tool_parser(None) is None
    with pytest.raises(ValueError, match="known: hermes, llama3_json, mistral"):
        tool_parser("nope")
    assert detect_reasoning_parser("{% if enable_thinking %}<think>") == "qwen3"
    assert detect_reasoning_parser("{{ '<think>\\n' }}") == "deepseek_r1"
    assert detect_reasoning_parser("plain") is None


REASONING = [
    ("deepseek_r1", "Let me think.</think>\n\nParis.", "Let me think.", "Paris."),
    ("deepseek_r1", "<think>\nhmm\n</think>The end", "\nhmm\n", "The end"),
    ("deepseek_r1", "still thinking <", "still thinking <", None),  # cut before </think>
    ("qwen3", "<think>x < y</think>\n\nyes", "x < y", "yes"),
    ("qwen3", "No thinking here.", None, "No thinking here."),
    ("qwen3", " <thin", None, " <thin"),
]


@pytest.mark.parametrize("name,text,reasoning,content", REASONING)
def test_reasoning_whole_and_streamed(name, text, reasoning, content):
    parser = reasoning_parser(name)
    assert parser.extract(text) == (reasoning, content)
    for pieces in [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]:
        st = parser.stream()
        steps = [st.feed(p) for p in pieces] + [st.finish()]
        assert "".join(s.reasoning for s in steps) == (reasoning or ""), pieces
        assert "".join(s.content for s in steps) == (content or ""), pieces
