"""Tool calling and reasoning end to end: the real server on loopback and clients nobody here wrote
(the openai SDK, streamed and not, over two turns; langchain-openai's ``bind_tools``). Scripted tiny
LMs (tests/models.py ``write_scripted_lm``) answer with a Hermes or Llama 3 tool call whatever they
are asked, for ``tool_choice: "auto"``; random ones show that a forced call (``required`` or a named
function) is valid whatever the weights."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("transformers")

from models import (HERMES_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, MISTRAL_CHAT_TEMPLATE, write_scripted_lm,  # noqa: E402
                    write_text_lm)
from servers import start_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ENGINE = "engine:\n  num_blocks: 512\n  block_size: 8\n  max_model_len: 1000\n"
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
HERMES_SCRIPT = ["<think>", "Weather needs a tool.", "</think>", "<tool_call>", PARIS, "</tool_call>"]
MISTRAL_SCRIPT = ["Sure.", "[TOOL_CALLS]", '[{"name": "get_time", "arguments": {"tz": "CET"}}, ',
                  '{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}]']
LLAMA_SCRIPT = ["<|python_tag|>", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}']
WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
                  "properties": {"city": {"type": "string", "maxLength": 8},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                 "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME_PARAMS = {"type": "object", "additionalProperties": False, "required": ["tz"],
               "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("toolrepo")
    write_scripted_lm(repo / "hermes" / "1", HERMES_CHAT_TEMPLATE, HERMES_SCRIPT)
    (repo / "hermes" / "model.yaml").write_text("backend: llm\ndevice: cpu\nreasoning_parser: qwen3\n" + ENGINE)
    write_scripted_lm(repo / "llama" / "1", LLAMA3_CHAT_TEMPLATE, LLAMA_SCRIPT, special=("<|python_tag|>",))
    (repo / "llama" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)  # parser detected
    write_scripted_lm(repo / "mistral" / "1", MISTRAL_CHAT_TEMPLATE, MISTRAL_SCRIPT, special=("[TOOL_CALLS]",))
    (repo / "mistral" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)  # parser detected
    write_text_lm(repo / "plain" / "1")  # a chat template without tools
    (repo / "plain" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE.replace("1000", "256"))
    write_text_lm(repo / "rand" / "1", max_position_embeddings=1024, chat_template=HERMES_CHAT_TEMPLATE)
    (repo / "rand" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    demo = Path(__file__).resolve().parents[2] / "src" / "rtserve" / "demo" / "data" / "demo-lm"
    shutil.copytree(demo, repo / "demo-lm" / "1")
    (repo / "demo-lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n")
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0), srv.url, repo


def _accumulate(stream):
    """OpenAI's streamed tool calls put together as a client does: by ``index``."""
    calls, content, reasoning, finish, first_items = {}, "", "", None, {}
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        reasoning += getattr(choice.delta, "reasoning_content", None) or ""
        for item in choice.delta.tool_calls or []:
            if item.index not in calls:
                first_items[item.index] = item
                calls[item.index] = {"id": item.id, "name": item.function.name, "arguments": ""}
            calls[item.index]["arguments"] += item.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, reasoning, finish, first_items


def test_auto_call_with_reasoning_whole_and_streamed(server):
    client, _, _ = server
    r = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, max_tokens=50, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.reasoning_content == "Weather needs a tool."
    (call,) = c.message.tool_calls
    assert CALL_ID.match(call.id) and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    calls, content, reasoning, finish, first = _accumulate(client.chat.completions.create(
        model="hermes", messages=ASK, tools=TOOLS, max_tokens=50, temperature=0, stream=True))
    assert finish == "tool_calls" and content == "" and reasoning == "Weather needs a tool."
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [("get_weather", {"city": "Paris", "days": 2})]
    assert CALL_ID.match(first[0].id) and first[0].type == "function" and first[0].function.name == "get_weather"


def test_second_turn_renders_the_call_and_the_tool_result(server):
    client, _, repo = server
    from rtserve.llm.tokenizer import Tokenizer

    r = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, max_tokens=50, temperature=0)
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    turn2 = ASK + [msg.model_dump(exclude_none=True, exclude={"reasoning_content"}),
                   {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    r2 = client.chat.completions.create(model="hermes", messages=turn2, tools=TOOLS, max_tokens=50, temperature=0)
    assert r2.choices[0].finish_reason == "tool_calls"
    # the template saw the call's arguments as an object (Hugging Face's convention) and the tool result
    tok = Tokenizer(repo / "hermes" / "1")
    want = ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    rendered = tok.apply_chat_template(want, tools=TOOLS)
    assert '"arguments": {"city": "Paris", "days": 2}}</tool_call>' in rendered and "Sunny, 21 C" in rendered
    assert r2.usage.prompt_tokens == len(tok.encode(rendered))


def test_llama3_format_with_its_special_tag(server):
    client, _, repo = server
    r = client.chat.completions.create(model="llama", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "days": 1})]
    calls, content, _, finish, _ = _accumulate(client.chat.completions.create(
        model="llama", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0, stream=True))
    assert finish == "tool_calls" and content == "" and calls[0]["name"] == "get_weather"
    # without tools nothing is parsed: the text (the kept special tag included) is the answer
    plain = client.chat.completions.create(model="llama", messages=ASK, max_tokens=20, temperature=0)
    assert plain.choices[0].message.content.startswith("<|python_tag|>{") and plain.choices[0].finish_reason == "stop"
    from rtserve.llm.tokenizer import Tokenizer

    tok = Tokenizer(repo / "llama" / "1")  # no tools: the template got none (not []), so no tools section
    assert plain.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(ASK))) < r.usage.prompt_tokens


def test_mistral_format_two_calls_after_text(server):
    client, _, _ = server
    r = client.chat.completions.create(model="mistral", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0)
    c = r.choices[0]
    want = [("get_time", {"tz": "CET"}), ("get_weather", {"city": "Rome", "days": 3})]
    assert c.finish_reason == "tool_calls" and c.message.content == "Sure."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == want
    assert len({t.id for t in c.message.tool_calls}) == 2
    calls, content, _, finish, first = _accumulate(client.chat.completions.create(
        model="mistral", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0, stream=True))
    assert finish == "tool_calls" and content == "Sure." and [(x["name"], json.loads(x["arguments"])) for x in calls] == want
    one = client.chat.completions.create(model="mistral", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0,
                                         parallel_tool_calls=False)
    assert [t.function.name for t in one.choices[0].message.tool_calls] == ["get_time"]


def test_tool_choice_none_and_a_model_without_a_tool_format(server):
    client, url, _ = server
    r = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=50, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls and c.message.content == "<tool_call>" + PARIS + "</tool_call>"
    assert c.message.reasoning_content == "Weather needs a tool."  # the reasoning is split all the same
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="plain", messages=ASK, tools=TOOLS, max_tokens=5)
    assert e.value.body["param"] == "tools" and "no tool-call format" in e.value.body["message"]
    bad = httpx.post(url + "/v1/chat/completions", json={"model": "hermes", "messages": ASK, "tools": TOOLS,
                                                         "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def _valid(name: str, arguments: str) -> bool:
    schema = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}[name]
    jsonschema.validate(json.loads(arguments), schema)
    return True


def test_forced_calls_are_valid_whatever_the_weights(server):
    client, _, _ = server
    named = {"type": "function", "function": {"name": "get_weather"}}
    seen = {"named": 0, "required": 0}
    for seed in range(4):
        for kind, choice in (("named", named), ("required", "required")):
            r = client.chat.completions.create(model="rand", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                                               temperature=1.0, max_tokens=200, parallel_tool_calls=False)
            c = r.choices[0]
            if c.finish_reason == "length":
                continue
            assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0]
            assert _valid(call.function.name, call.function.arguments) and CALL_ID.match(call.id)
            assert kind == "required" or call.function.name == "get_weather"
            seen[kind] += 1
    assert seen["named"] >= 3 and seen["required"] >= 3, seen
    calls, content, _, finish, first = _accumulate(client.chat.completions.create(
        model="rand", messages=ASK, tools=TOOLS, tool_choice=named, seed=1, temperature=1.0, max_tokens=200,
        stream=True))
    assert finish == "tool_calls" and content == "" and first[0].function.name == "get_weather"
    assert _valid("get_weather", calls[0]["arguments"])


def test_demo_lm_keeps_working_with_tools(server):
    client, _, _ = server
    plain = client.chat.completions.create(model="demo-lm", messages=ASK, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content and plain.choices[0].finish_reason in ("stop", "length")
    auto = client.chat.completions.create(model="demo-lm", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    forced = client.chat.completions.create(model="demo-lm", messages=ASK, tools=TOOLS, temperature=0,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert forced.choices[0].finish_reason == "tool_calls"
    assert _valid("get_time", forced.choices[0].message.tool_calls[0].function.arguments)


def test_langchain_bind_tools(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    _, url, _ = server
    llm = ChatOpenAI(base_url=url + "/v1", api_key="x", model="hermes", temperature=0, max_tokens=50, max_retries=0)
    ai = llm.bind_tools(TOOLS).invoke("Weather in Paris?")  # auto: the model's own call, parsed
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris", "days": 2})]
    forced = ChatOpenAI(base_url=url + "/v1", api_key="x", model="rand", temperature=1.0, max_tokens=200, seed=0,
                        max_retries=0).bind_tools(TOOLS, tool_choice="get_time")
    ai = forced.invoke("What time is it?")
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    (call,) = ai.tool_calls
    assert call["name"] == "get_time" and call["args"]["tz"] in ("UTC", "CET", "PST")


def test_instructor_tools_mode(server):
    instructor = pytest.importorskip("instructor")
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal

    class Forecast(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # a closed object: random weights finish it
        city: pydantic.constr(max_length=8)
        days: pydantic.conint(ge=1, le=7)
        unit: Literal["celsius", "fahrenheit"]

    client, _, _ = server
    structured = instructor.from_openai(client, mode=instructor.Mode.TOOLS)  # a forced named call
    got = [structured.chat.completions.create(model="rand", response_model=Forecast, messages=ASK, max_tokens=200,
                                              temperature=1.0, seed=seed, max_retries=0) for seed in range(2)]
    assert all(isinstance(f, Forecast) for f in got) and got[0] != got[1]
