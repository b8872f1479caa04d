"""The structured-output fields of the OpenAI API into one StructuredSpec, and the 400s of bad shapes."""
from __future__ import annotations

import json

import pytest

from rtserve.llm.structured import StructuredSpec
from rtserve.server.protocols.openai import OpenAIError, parse

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def req(chat=True, **extra) -> bytes:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]} if chat else {"model": "m", "prompt": "x"}
    return json.dumps({**base, **extra}).encode()


@pytest.mark.parametrize("extra,want", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredSpec("json_object", "", "response_format")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":")), "response_format.json_schema.schema")),
    ({"structured_outputs": {"json": SCHEMA}},
     StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":")), "structured_outputs.json")),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":")),
                                                         "guided_json")),
    ({"structured_outputs": {"regex": "a+"}}, StructuredSpec("regex", "a+", "structured_outputs.regex")),
    ({"guided_regex": "a+"}, StructuredSpec("regex", "a+", "guided_regex")),
    ({"structured_outputs": {"choice": ["x", "y"]}}, StructuredSpec("choice", '["x", "y"]', "structured_outputs.choice")),
    ({"guided_choice": ["x"]}, StructuredSpec("choice", '["x"]', "guided_choice")),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredSpec("grammar", 'root ::= "a"',
                                                                         "structured_outputs.grammar")),
    ({"guided_grammar": 'root ::= "a"'}, StructuredSpec("grammar", 'root ::= "a"', "guided_grammar")),
    ({"structured_outputs": {"json_object": True}}, StructuredSpec("json_object", "", "structured_outputs.json_object")),
])
def test_each_spelling_becomes_one_spec_on_both_endpoints(extra, want):
    for chat in (True, False):
        assert parse(req(chat, **extra), chat).params.structured == want


def test_the_schema_keeps_its_property_order():
    spec = parse(req(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}), True)
    assert list(json.loads(spec.params.structured.value)["properties"]) == ["b", "a"]


@pytest.mark.parametrize("extra,param", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": "{}"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "x": 1}}},
     "response_format.json_schema.x"),
    ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": ["a", 1]}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
])
def test_bad_shapes_and_two_constraints_are_400s_naming_the_field(extra, param):
    with pytest.raises(OpenAIError) as e:
        parse(req(**extra), True)
    assert e.value.status == 400 and e.value.param == param, e.value.message
