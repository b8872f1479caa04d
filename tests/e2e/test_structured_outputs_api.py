"""Structured outputs end to end: the real server on loopback, the unmodified openai client
(``chat.completions.parse`` with a pydantic model), vLLM's extra fields through ``extra_body``, and
the 400s a bad constraint gets before anything is queued."""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("transformers")

from models import write_random_llama, write_text_lm  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ENGINE = "engine:\n  num_blocks: 256\n  block_size: 8\n  max_model_len: 256\n"


class Person(pydantic.BaseModel):
    name: pydantic.constr(max_length=8)
    age: pydantic.conint(ge=0, le=99)
    role: Literal["admin", "user", "guest"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("structrepo")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    write_random_llama(repo / "bare" / "1")  # no tokenizer.json
    (repo / "bare" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0), srv.url


def test_parse_with_a_pydantic_model_answers_a_valid_instance(server):
    client, _ = server
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    answers = []
    for seed in range(6):
        try:
            r = parse(model="lm", messages=[{"role": "user", "content": "Who?"}],
                                              response_format=Person, seed=seed, temperature=1.0,
                                              max_completion_tokens=200)
        except openai.LengthFinishReasonError:
            continue
        assert r.choices[0].finish_reason == "stop"
        answers.append(r.choices[0].message.parsed)
    assert len(answers) >= 5 and all(isinstance(a, Person) for a in answers)
    assert len({a.model_dump_json() for a in answers}) > 1  # the seeds draw different answers


def test_streamed_completion_n_choices_and_seeds(server):
    client, _ = server
    schema = Person.model_json_schema() | {"additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    chunks = list(client.completions.create(model="lm", prompt="Name:", max_tokens=200, seed=11, n=3, stream=True,
                                            extra_body={"response_format": fmt}))
    texts, reasons = ["", "", ""], [None, None, None]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    for text, reason in zip(texts, reasons):
        if reason == "stop":
            Person.model_validate_json(text)
    assert reasons.count("stop") >= 2
    again = client.completions.create(model="lm", prompt="Name:", max_tokens=200, seed=11, n=3,
                                      extra_body={"response_format": fmt})
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts


def test_vllm_fields_regex_choice_and_grammar(server):
    client, _ = server
    cases = [({"structured_outputs": {"regex": r"[a-z]{2,5}-[0-9]{2}"}}, r"[a-z]{2,5}-[0-9]{2}"),
             ({"guided_regex": r"(red|green|blue)!"}, r"(red|green|blue)!"),
             ({"guided_choice": ["north", "south"]}, r"north|south"),
             ({"structured_outputs": {"choice": ["up", "down"]}}, r"up|down"),
             ({"guided_grammar": 'root ::= "v" [0-9] "." [0-9]'}, r"v[0-9]\.[0-9]"),
             ({"structured_outputs": {"json": {"type": "object", "additionalProperties": False, "required": ["k"],
                                                "properties": {"k": {"type": "boolean"}}}}}, r'\{"k":(true|false)\}')]
    for extra, pattern in cases:
        r = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], n=2, seed=5,
                                           max_completion_tokens=40, extra_body=extra)
        for c in r.choices:
            assert c.finish_reason == "stop" and re.fullmatch(pattern, c.message.content), (extra, c.message.content)
    r = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=20,
                                       stop=["-b"], extra_body={"guided_choice": ["alpha-beta"]})
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("alpha", "stop")


def test_bad_constraints_are_400s_naming_the_field(server):
    _, url = server
    person = {"name": "p", "schema": {"type": "object"}}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}}},
         "response_format.json_schema.schema", "invalid json schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
         "response_format.json_schema.schema", "must be a JSON schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "must be"),
        ({"response_format": {"type": "json_schema", "json_schema": person}, "guided_regex": "a+"},
         "guided_regex", "both constrain"),
        ({"structured_outputs": {"regex": "(["}}, "structured_outputs.regex", "invalid regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar", "invalid grammar"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ]
    with httpx.Client(base_url=url, timeout=30) as http:
        for extra, param, words in cases:
            r = http.post("/v1/chat/completions", json={"model": "lm", "messages": [{"role": "user", "content": "x"}],
                                                        **extra})
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], (extra, err)
        r = http.post("/v1/completions", json={"model": "bare", "prompt": [1, 2, 3],
                                               "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "need the model's tokenizer" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "lm", "prompt": "x", "max_tokens": 30,
                                               "response_format": {"type": "text"}})
        assert r.status_code == 200
