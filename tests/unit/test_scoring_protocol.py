"""The scoring and tokenizer codecs without a server or a model: pairs, ordering, strictness."""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from rtserve.server.protocols import scoring
from rtserve.server.protocols import tokenize as tp
from rtserve.server.protocols.openai import OpenAIError


def body(**doc) -> bytes:
    return orjson.dumps(doc)


def test_score_pairs_one_to_many_pairwise_and_single():
    one = scoring.parse_score(body(model="m", text_1="q", text_2=["a", "b", "c"]))
    assert one.pairs == [("q", "a"), ("q", "b"), ("q", "c")]
    listed_one = scoring.parse_score(body(model="m", text_1=["q"], text_2=["a", "b"]))
    assert listed_one.pairs == [("q", "a"), ("q", "b")]
    pairwise = scoring.parse_score(body(model="m", text_1=["x", "y"], text_2=["a", "b"]))
    assert pairwise.pairs == [("x", "a"), ("y", "b")]
    assert scoring.parse_score(body(model="m", text_1="x", text_2="a")).pairs == [("x", "a")]


def test_rerank_defaults_order_ties_and_top_n():
    req = scoring.parse_rerank(body(model="m", query="q", documents=["a", "b", "c", "d"], top_n=None))
    assert req.top_n == 4 and req.return_documents and req.pairs[1] == ("q", "b")
    out = orjson.loads(scoring.rerank_response(req, np.float32([0.1, 0.7, 0.7, 0.3]), 12))
    assert [r["index"] for r in out["results"]] == [1, 2, 3, 0]  # ties keep document order
    assert out["results"][0] == {"index": 1, "relevance_score": pytest.approx(0.7), "document": {"text": "b"}}
    assert out["usage"] == {"total_tokens": 12}
    req = scoring.parse_rerank(body(model="m", query="q", documents=["a", "b"], top_n=1, return_documents=False))
    out = orjson.loads(scoring.rerank_response(req, np.float32([0.1, 0.7]), 5))
    assert out["results"] == [{"index": 1, "relevance_score": pytest.approx(0.7)}]


@pytest.mark.parametrize("doc,param,needle", [
    (dict(model="m", query="q", documents=["a"], foo=1, bar=2), "foo", "unknown fields 'foo', 'bar'"),
    (dict(model="m", query="q", documents=["a"], top_n=2), "top_n", "between 1 and the number of documents (1)"),
    (dict(model="m", query="q", documents=["a"], top_n=1.0), "top_n", "an integer"),
    (dict(model="m", query="q", documents=[None]), "documents", "documents[0] must be a string"),
    (dict(model="m", query=["q"], documents=["a"]), "query", "non-empty string"),
    (dict(model="", query="q", documents=["a"]), "model", "'model' is required"),
])
def test_rerank_refusals_name_the_field(doc, param, needle):
    with pytest.raises(OpenAIError) as e:
        scoring.parse_rerank(orjson.dumps(doc))
    assert e.value.status == 400 and e.value.param == param and needle in e.value.message


def test_bodies_that_are_not_objects():
    for raw in (b"[1]", b"nope", b'"s"'):
        with pytest.raises(OpenAIError):
            scoring.parse_score(raw)
        with pytest.raises(OpenAIError):
            tp.parse_tokenize(raw)


def test_tokenize_and_detokenize_parsing():
    req = tp.parse_tokenize(body(prompt="hi"))
    assert (req.model, req.prompt, req.messages, req.add_special_tokens) == (None, "hi", None, True)
    chat = tp.parse_tokenize(body(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                                  add_generation_prompt=False, add_special_tokens=False))
    assert chat.messages == [{"role": "user", "content": "a"}] and not chat.add_generation_prompt
    for doc, param in ((dict(), "prompt"), (dict(prompt="a", add_generation_prompt=True), "add_generation_prompt"),
                       (dict(prompt="a", add_special_tokens="no"), "add_special_tokens"),
                       (dict(prompt="a", model=3), "model")):
        with pytest.raises(OpenAIError) as e:
            tp.parse_tokenize(orjson.dumps(doc))
        assert e.value.param == param
    assert tp.parse_detokenize(body(tokens=[])).tokens == []
    with pytest.raises(OpenAIError, match=r"tokens\[1\]"):
        tp.parse_detokenize(body(tokens=[1, False]))
