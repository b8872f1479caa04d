"""Tool calling in the chat API, without a model: request validation (400 naming the field), the
forced-call schema, messages for the chat template, the chat template's rendering of tools, and
choices read into reasoning_content / content / tool_calls, whole and streamed."""
from __future__ import annotations

import json

import orjson
import pytest

from rtserve.llm.tokenizer import Tokenizer
from rtserve.server.chat_output import ChatOutput, for_request
from rtserve.server.protocols.openai import OpenAIError, parse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 20}},
                                                 "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _req(**fields):
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse(orjson.dumps(doc), chat=True)


@pytest.mark.parametrize("fields,param,words", [
    ({"tools": {"type": "function"}}, "tools", "'tools' must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0] must be an object with type 'function'"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad name"}}]}, "tools", "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools",
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "must describe an object"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "'tool_choice' must be"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools given"),
    ({"tool_choice": "required"}, "tool_choice", "no tools are given"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls", "must be a boolean"),
    ({"functions": [WEATHER["function"]], "tools": [WEATHER]}, "functions", "not both"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "cannot set 'messages'"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs", "must be an object"),
    ({"messages": [{"role": "tool", "content": "3"}]}, "messages", "needs 'tool_call_id'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]}, "messages",
     "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "messages[0].content must be a string"),
])
def test_bad_tool_fields_are_400s_naming_the_field(fields, param, words):
    with pytest.raises(OpenAIError) as e:
        _req(**fields)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_tool_choice_defaults_and_forced_schemas():
    assert _req().tools.choice == "none" and _req(tools=[WEATHER]).tools.choice == "auto"
    nulls = _req(tools=None, tool_choice=None, parallel_tool_calls=None, functions=None, chat_template_kwargs=None)
    assert nulls.tools.choice == "none" and nulls.tools.parallel and nulls.template_kwargs == {}
    named = _req(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tools.function == "get_weather" and named.params.structured.param == "tool_choice"
    assert json.loads(named.params.structured.value) == WEATHER["function"]["parameters"]
    req = _req(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(req.params.structured.value)
    assert schema["type"] == "array" and schema["minItems"] == schema["maxItems"] == 1
    assert [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object"}
    assert _req(tools=[WEATHER], tool_choice="auto").params.structured is None
    legacy = _req(functions=[WEATHER["function"]], function_call={"name": "get_weather"})
    assert legacy.tools.legacy and legacy.tools.choice == "function" and not legacy.tools.parallel


def test_messages_for_the_template():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "-3 C"}]}]
    req = _req(messages=msgs, tools=[WEATHER, TIME], chat_template_kwargs={"enable_thinking": False})
    calls = req.messages[1]["tool_calls"]
    assert calls[0]["function"]["arguments"] == {"city": "Oslo"} and calls[1]["function"]["arguments"] == "not json"
    assert req.messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}
    assert req.template_kwargs == {"enable_thinking": False}
    legacy = _req(messages=[{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "function_call": {
        "name": "get_weather", "arguments": "{}"}}, {"role": "function", "name": "get_weather", "content": "sun"}])
    assert legacy.messages[1]["tool_calls"][0]["id"] == legacy.messages[2]["tool_call_id"] == "call_1"


def test_chat_template_renders_tools_and_kwargs(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models

    HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    template = ("{% for t in tools %}{{ t.function | tojson }}{% endfor %}|{% for m in messages %}"
                "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
                "|{{ 'think' if enable_thinking else 'no-think' }}|{{ strftime_now('%Y') | length }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    req = _req(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich <3>"}'}}]}],
        tools=[TIME], chat_template_kwargs={"enable_thinking": True})
    out = Tokenizer(tmp_path).apply_chat_template(req.messages, tools=req.tools.tools, **req.template_kwargs)
    assert out == '{"name": "get_time"}|{"city": "Zürich <3>"}|think|4'  # HF's tojson: no HTML escapes


class _Model:
    tool_parser, reasoning_parser = "hermes", "qwen3"


class _NoFormat:
    tool_parser = reasoning_parser = None


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _stream(out: ChatOutput, pieces, reason="stop"):
    st = out.stream()
    deltas = [st.feed(p) for p in pieces]
    last, finish = st.finish(reason)
    return deltas + [last], finish


def test_choices_read_whole_and_streamed():
    out = for_request(_req(tools=[WEATHER]), _Model())
    text = "<think>Need the weather.</think>\n\nChecking. " + CALL + CALL.replace("Paris", "Oslo")
    msg, finish = out.message(text, "stop")
    assert finish == "tool_calls" and msg["content"] == "Checking." and msg["reasoning_content"] == "Need the weather."
    assert [json.loads(c["function"]["arguments"])["city"] for c in msg["tool_calls"]] == ["Paris", "Oslo"]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 for c in msg["tool_calls"])
    deltas, finish = _stream(out, [text[i:i + 3] for i in range(0, len(text), 3)])
    items = [t for d in deltas for t in d.get("tool_calls", [])]
    assert finish == "tool_calls" and [t["index"] for t in items if "id" in t] == [0, 1]
    assert items[0]["function"]["name"] == "get_weather" and items[0]["type"] == "function"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Need the weather."
    assert "".join(d.get("content", "") for d in deltas).strip() == "Checking."
    assert msg == out.message(text, "stop")[0] | {"tool_calls": msg["tool_calls"]}
    cut, finish = out.message(CALL, "length")
    assert finish == "length" and cut["tool_calls"]  # complete calls in a cut output: not "tool_calls"
    deltas, finish = _stream(out, [CALL[:40]])  # the model ended inside a call: no call was made
    assert finish == "stop" and deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    one = for_request(_req(tools=[WEATHER], parallel_tool_calls=False), _Model())
    assert len(one.message(CALL + CALL, "stop")[0]["tool_calls"]) == 1
    assert for_request(_req(), _NoFormat()) is None and for_request(_req(tools=[WEATHER]), object()) is None


def test_forced_outputs_and_the_model_without_a_format():
    named = for_request(_req(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                        _Model())
    msg, finish = named.message('{"city": "Rome"}', "stop")
    assert finish == "tool_calls" and msg["content"] is None and "reasoning_content" not in msg
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert named.message('{"city": "Ro', "length") == ({"role": "assistant", "content": '{"city": "Ro'}, "length")
    deltas, finish = _stream(named, ['{"ci', 'ty": "Rome"}'])
    assert finish == "tool_calls" and deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert deltas[1]["tool_calls"] == [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]
    required = for_request(_req(tools=[WEATHER, TIME], tool_choice="required"), _NoFormat())
    msg, finish = required.message('[{"name": "get_time", "parameters": {}}]', "stop")
    assert finish == "tool_calls" and msg["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    # cut by max_tokens inside a second call: the complete call is kept, the cut one is not content
    msg, finish = required.message('[{"name": "get_time", "parameters": {}},{"name": "get_w', "length")
    assert finish == "length" and msg["content"] is None and len(msg["tool_calls"]) == 1
    legacy = for_request(_req(functions=[WEATHER["function"]], function_call={"name": "get_weather"}), _Model())
    msg, finish = legacy.message('{"city": "Rome"}', "stop")
    assert finish == "function_call" and msg["function_call"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    with pytest.raises(OpenAIError) as e:
        for_request(_req(tools=[WEATHER]), _NoFormat())
    assert e.value.param == "tools" and "no tool-call format" in e.value.message


def test_model_yaml_parsers_named_detected_or_none(tmp_path):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, models

    from rtserve.config import ModelConfig
    from rtserve.errors import ConfigError
    from rtserve.models.llm import _parsers

    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    hf.add_special_tokens([AddedToken("<|python_tag|>", special=True), AddedToken("<|eot|>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<think> <|python_tag|>"}))
    tok = Tokenizer(tmp_path)
    cfg = lambda **kw: ModelConfig.from_dict("m", {"backend": "llm", **kw})  # noqa: E731
    assert _parsers(cfg(), tok) == ("llama3_json", "deepseek_r1")
    ids = [tok.hf.token_to_id(t) for t in ("a", "<|python_tag|>", "<|eot|>")]
    assert tok.decode(ids).split() == ["a", "<|python_tag|>"]  # the marker is kept, other special tokens are not
    assert _parsers(cfg(tool_parser="hermes", reasoning_parser="none"), tok) == ("hermes", None)
    with pytest.raises(ConfigError, match="tool_parser: 'qwen' is not one of hermes, llama3_json, mistral or none"):
        _parsers(cfg(tool_parser="qwen"), tok)
    with pytest.raises(ConfigError, match="tool_parser: a parser's name, for backend llm only"):
        ModelConfig.from_dict("m", {"backend": "onnx", "tool_parser": "hermes"})
