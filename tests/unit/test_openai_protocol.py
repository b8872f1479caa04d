"""The OpenAI request parser (``protocols/openai.py``), and ``/openapi.json`` describing exactly what
it and the KServe v2 decoder accept."""
from __future__ import annotations

import orjson
import pytest

from rtserve.errors import InvalidInput
from rtserve.server.openapi import openapi_document
from rtserve.server.protocols import kserve_v2
from rtserve.server.protocols import openai as oai

CHAT = {"model": "lm", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "lm", "prompt": "hi"}


def _refused(body: dict, chat: bool) -> oai.OpenAIError:
    with pytest.raises(oai.OpenAIError) as e:
        oai.parse(orjson.dumps(body), chat)
    assert e.value.status == 400
    return e.value


def test_max_completion_tokens_zero_is_a_400_not_unset():
    e = _refused({**CHAT, "max_completion_tokens": 0}, chat=True)
    assert e.param == "max_completion_tokens" and "must be at least 1" in e.message
    assert _refused({**CHAT, "max_completion_tokens": 0, "max_tokens": 5}, chat=True).param == "max_completion_tokens"
    assert _refused({**CHAT, "max_completion_tokens": -3}, chat=True).param == "max_completion_tokens"
    req = oai.parse(orjson.dumps({**CHAT, "max_completion_tokens": 7, "max_tokens": 5}), True)
    assert req.params.max_tokens == 7 and req.max_tokens_given
    req = oai.parse(orjson.dumps({**CHAT, "max_completion_tokens": None, "max_tokens": 5}), True)
    assert req.params.max_tokens == 5


@pytest.mark.parametrize("ids", [[-1], [1e12], ["a"], [True], [1, 2.5], [[3]]])
@pytest.mark.parametrize("chat", [False, True])
def test_stop_token_ids_must_be_integers_at_least_0(ids, chat):
    e = _refused({**(CHAT if chat else COMPLETION), "stop_token_ids": ids}, chat)
    assert e.param == "stop_token_ids" and "integers >= 0" in e.message


@pytest.mark.parametrize("chat", [False, True])
def test_stop_strings_are_bounded(chat):
    doc = CHAT if chat else COMPLETION
    e = _refused({**doc, "stop": ["x"] * 65}, chat)
    assert e.param == "stop" and "at most 64" in e.message
    assert oai.parse(orjson.dumps({**doc, "stop": ["x"] * 64}), chat).params.stop == ("x",) * 64


def test_good_stop_token_ids_pass():
    req = oai.parse(orjson.dumps({**COMPLETION, "stop_token_ids": [0, 7, 10**12]}), False)
    assert req.params.stop_token_ids == (0, 7, 10**12)  # ids past the vocabulary: the model's check


@pytest.mark.parametrize("extra,param", [
    ({"top_logprobs": 50}, "top_logprobs"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
])
def test_chat_fields_of_the_wrong_kind_are_400s(extra, param):
    assert _refused({**CHAT, **extra}, chat=True).param == param


# -- /openapi.json against the parsers ------------------------------------------------------------

def _accepted(kind: str, doc) -> bool:
    body = orjson.dumps(doc)
    try:
        if kind == "CompletionRequest":
            oai.parse(body, False)
        elif kind == "ChatCompletionRequest":
            oai.parse(body, True)
        elif kind == "EmbeddingRequest":
            oai.parse_embeddings(body)
        else:
            kserve_v2.decode_request(body, None)
    except (oai.OpenAIError, InvalidInput):
        return False
    return True


T = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}
SAMPLES = [
    ("CompletionRequest", COMPLETION), ("CompletionRequest", {**COMPLETION, "model": None}),
    ("CompletionRequest", {"prompt": "hi"}), ("CompletionRequest", {**COMPLETION, "model": ""}),
    ("CompletionRequest", {**COMPLETION, "model": 3}), ("CompletionRequest", {"model": "lm", "prompt": [1, 2]}),
    ("CompletionRequest", {"model": "lm", "prompt": ["hi"]}), ("CompletionRequest", {"model": "lm", "prompt": ["a", "b"]}),
    ("CompletionRequest", {"model": "lm", "prompt": [[1, 2]]}), ("CompletionRequest", {"model": "lm", "prompt": ""}),
    ("CompletionRequest", {"model": "lm", "prompt": None}), ("CompletionRequest", {"model": "lm", "prompt": []}),
    ("CompletionRequest", {**COMPLETION, "max_tokens": 0}), ("CompletionRequest", {**COMPLETION, "max_tokens": None}),
    ("CompletionRequest", {**COMPLETION, "temperature": None}), ("CompletionRequest", {**COMPLETION, "temperature": True}),
    ("CompletionRequest", {**COMPLETION, "top_k": -1}), ("CompletionRequest", {**COMPLETION, "top_k": -2}),
    ("CompletionRequest", {**COMPLETION, "top_p": 0}), ("CompletionRequest", {**COMPLETION, "stop": ""}),
    ("CompletionRequest", {**COMPLETION, "stop": ["a", "b"]}), ("CompletionRequest", {**COMPLETION, "logprobs": 21}),
    ("CompletionRequest", {**COMPLETION, "stop": ["a"] * 64}), ("CompletionRequest", {**COMPLETION, "stop": ["a"] * 65}),
    ("CompletionRequest", {**COMPLETION, "stop_token_ids": [-1]}), ("CompletionRequest", {**COMPLETION, "n": 65}),
    ("CompletionRequest", {**COMPLETION, "stream_options": {"include_usage": 1}}),
    ("ChatCompletionRequest", CHAT), ("ChatCompletionRequest", {**CHAT, "model": None}),
    ("ChatCompletionRequest", {"model": "lm", "messages": []}),
    ("ChatCompletionRequest", {"model": "lm", "messages": [{"content": "x"}]}),
    ("ChatCompletionRequest", {"model": "lm", "messages": [{"role": "user", "content": None}]}),
    ("ChatCompletionRequest", {"model": "lm", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    ("ChatCompletionRequest", {**CHAT, "max_completion_tokens": 0}), ("ChatCompletionRequest", {**CHAT, "max_tokens": 3}),
    ("ChatCompletionRequest", {**CHAT, "logprobs": True, "top_logprobs": 21}),
    ("ChatCompletionRequest", {**CHAT, "logprobs": None}),
    # no field is silently ignored (openai_fields): unknown and refused fields are 400s, defaults are taken
    ("ChatCompletionRequest", {**CHAT, "frobnicate": 1}), ("CompletionRequest", {**COMPLETION, "messages": []}),
    ("ChatCompletionRequest", {**CHAT, "store": False}), ("ChatCompletionRequest", {**CHAT, "store": True}),
    ("ChatCompletionRequest", {**CHAT, "modalities": ["text"]}),
    ("ChatCompletionRequest", {**CHAT, "modalities": ["text", "audio"]}),
    ("ChatCompletionRequest", {**CHAT, "audio": {"voice": "alloy"}}), ("ChatCompletionRequest", {**CHAT, "audio": None}),
    ("ChatCompletionRequest", {**CHAT, "service_tier": "auto"}), ("ChatCompletionRequest", {**CHAT, "service_tier": "flex"}),
    ("ChatCompletionRequest", {**CHAT, "user": "u", "safety_identifier": "s", "metadata": {"a": "b"}}),
    ("ChatCompletionRequest", {**CHAT, "metadata": {"a": 1}}), ("ChatCompletionRequest", {**CHAT, "user": 3}),
    ("ChatCompletionRequest", {**CHAT, "logit_bias": {"5": 100, "6": -100}}),
    ("ChatCompletionRequest", {**CHAT, "logit_bias": {"x": 1}}), ("ChatCompletionRequest", {**CHAT, "logit_bias": {"5": 101}}),
    ("ChatCompletionRequest", {**CHAT, "stream": True, "stream_options": {"include_usage": True,
                                                                          "include_obfuscation": True}}),
    ("ChatCompletionRequest", {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}}),
    ("ChatCompletionRequest", {**CHAT, "stream_options": {"include_usage": True}}),
    ("ChatCompletionRequest", {**CHAT, "stream": False, "stream_options": {"include_usage": True}}),
    ("CompletionRequest", {**COMPLETION, "stream": False, "stream_options": {}}),
    ("CompletionRequest", {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}),
    ("ChatCompletionRequest", {"model": "lm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
    ("CompletionRequest", {**COMPLETION, "echo": False, "suffix": "", "best_of": 1}),
    ("CompletionRequest", {**COMPLETION, "echo": True}), ("CompletionRequest", {**COMPLETION, "suffix": "x"}),
    ("CompletionRequest", {**COMPLETION, "priority": -3}), ("CompletionRequest", {**COMPLETION, "priority": "high"}),
    ("EmbeddingRequest", {"model": "e", "input": "a", "temperature": 0}),
    ("EmbeddingRequest", {"model": "e", "input": "a"}), ("EmbeddingRequest", {"model": None, "input": "a"}),
    ("EmbeddingRequest", {"model": "e", "input": ""}), ("EmbeddingRequest", {"model": "e", "input": ["a", "b"]}),
    ("EmbeddingRequest", {"model": "e", "input": ["a", ""]}), ("EmbeddingRequest", {"model": "e", "input": [1, 2]}),
    ("EmbeddingRequest", {"model": "e", "input": [[1], [2, 3]]}), ("EmbeddingRequest", {"model": "e", "input": [[]]}),
    ("EmbeddingRequest", {"model": "e", "input": ["a", 1]}), ("EmbeddingRequest", {"model": "e", "input": []}),
    ("EmbeddingRequest", {"model": "e", "input": ["a"] * 2049}),
    ("EmbeddingRequest", {"model": "e", "input": "a", "encoding_format": "hex"}),
    ("EmbeddingRequest", {"model": "e", "input": "a", "encoding_format": None, "dimensions": 0}),
    ("InferRequest", {"inputs": [T]}), ("InferRequest", {"inputs": []}), ("InferRequest", {"inputs": [T], "id": None}),
    ("InferRequest", {"inputs": [{**T, "data": [1, None]}]}), ("InferRequest", {"inputs": [{**T, "data": None}]}),
    ("InferRequest", {"inputs": [T], "parameters": None}), ("InferRequest", {"inputs": [T], "parameters": False}),
    ("InferRequest", {"inputs": [T], "parameters": {"priority": -1}}),
    ("InferRequest", {"inputs": [T], "parameters": {"binary_data_output": None}}),
    ("InferRequest", {"inputs": [T], "outputs": [{"parameters": {}}]}),
    ("InferRequest", {"inputs": [T], "outputs": [{"name": "y", "parameters": {"classification": None}}]}),
    ("InferRequest", {"inputs": [T], "outputs": [{"name": "y", "parameters": {"binary_data": None}}]}),
    ("InferRequest", {"inputs": [{**T, "shape": [-1]}]}), ("InferRequest", {"inputs": [{**T, "datatype": "BF16"}]}),
]


@pytest.mark.parametrize("kind,doc", SAMPLES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SAMPLES)])
def test_the_openapi_request_schemas_accept_what_the_parsers_accept(kind, doc):
    jsonschema = pytest.importorskip("jsonschema")
    spec = openapi_document()
    validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{kind}",
                                                 "components": spec["components"]})
    assert validator.is_valid(doc) == _accepted(kind, doc), (kind, doc)


def test_the_openai_paths_name_their_request_schemas():
    paths = openapi_document()["paths"]
    for path, schema in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                         ("/v1/embeddings", "EmbeddingRequest")):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{schema}"}, path
