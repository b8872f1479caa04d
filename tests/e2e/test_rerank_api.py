"""/v1/rerank, /v1/score and the tokenizer endpoints end to end: the real server on loopback with a
tiny random cross-encoder and a tiny language model; scores checked against the model run directly
(itself checked against sentence-transformers in tests/llm/test_cross_encoder.py)."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers")

from cross_encoders import sentences, write_tiny_cross_encoder  # noqa: E402
from models import write_text_lm  # noqa: E402
from rtserve import __version__  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)
QUERY = "the quick fox"
DOCS = ["a lazy dog", "the quick brown fox jumps", "snow falls on the model server", "hello world",
        "the quick brown fox jumps over the lazy dog " * 8]  # the last one is truncated


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from rtserve.config import ModelConfig
    from rtserve.models.cross_encoder import CrossEncoderModel

    repo = tmp_path_factory.mktemp("rerankrepo")
    write_tiny_cross_encoder(repo / "ce" / "1")
    (repo / "ce" / "model.yaml").write_text("backend: cross_encoder\ndevice: cpu\nmax_batch_size: 32\n")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\nengine:\n  num_blocks: 32\n  block_size: 4\n"
                                            "  max_model_len: 64\n")
    ref = CrossEncoderModel(ModelConfig.from_dict("ce", {"backend": "cross_encoder", "device": "cpu"}), repo / "ce", 1)
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield client, ref


def scores_of(ref, pairs) -> np.ndarray:
    return ref._run(ref.encode(pairs))


def test_rerank_sorts_by_score_and_matches_the_model(server):
    c, ref = server
    expected = scores_of(ref, [(QUERY, d) for d in DOCS])
    r = c.post("/v1/rerank", json={"model": "ce", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "ce" and body["id"].startswith("rerank-") and len(body["results"]) == len(DOCS)
    got = [x["relevance_score"] for x in body["results"]]
    assert got == sorted(got, reverse=True)
    assert [x["index"] for x in body["results"]] == list(np.argsort(-expected, kind="stable"))
    for x in body["results"]:
        assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-5
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert body["usage"]["total_tokens"] == sum(len(e.ids) for e in ref.encode([(QUERY, d) for d in DOCS]))
    top = c.post("/rerank", json={"model": "ce", "query": QUERY, "documents": DOCS, "top_n": 2,
                                  "return_documents": False}).json()
    assert [x["index"] for x in top["results"]] == [x["index"] for x in body["results"][:2]]
    assert all("document" not in x for x in top["results"])
    assert c.post("/v2/rerank", json={"model": "ce", "query": QUERY, "documents": DOCS[:1]}).status_code == 200


def test_score_one_to_many_and_pairwise(server):
    c, ref = server
    r = c.post("/v1/score", json={"model": "ce", "text_1": QUERY, "text_2": DOCS}).json()
    assert r["object"] == "list" and [d["index"] for d in r["data"]] == list(range(len(DOCS)))
    assert all(d["object"] == "score" for d in r["data"])
    assert np.allclose([d["score"] for d in r["data"]], scores_of(ref, [(QUERY, d) for d in DOCS]), atol=1e-5)
    firsts = ["hello", "snow falls", "def serve"]
    pair = c.post("/score", json={"model": "ce", "text_1": firsts, "text_2": DOCS[:3]}).json()
    assert np.allclose([d["score"] for d in pair["data"]], scores_of(ref, list(zip(firsts, DOCS[:3]))), atol=1e-5)
    assert pair["usage"]["prompt_tokens"] == pair["usage"]["total_tokens"] > 0
    one = c.post("/v1/score", json={"model": "ce", "text_1": ["hello"], "text_2": "world"}).json()
    assert len(one["data"]) == 1


RERANK = {"model": "ce", "query": QUERY, "documents": DOCS[:3]}


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/rerank", {**RERANK, "top_n": 0}, 400, "top_n"),
    ("/v1/rerank", {**RERANK, "top_n": 4}, 400, "top_n"),
    ("/v1/rerank", {**RERANK, "top_n": True}, 400, "top_n"),
    ("/v1/rerank", {**RERANK, "documents": []}, 400, "documents"),
    ("/v1/rerank", {**RERANK, "documents": ["a", ""]}, 400, "documents"),
    ("/v1/rerank", {**RERANK, "documents": ["a", 3]}, 400, "documents"),
    ("/v1/rerank", {**RERANK, "documents": "a"}, 400, "documents"),
    ("/v1/rerank", {**RERANK, "documents": ["a"] * 2049}, 400, "documents"),
    ("/v1/rerank", {**RERANK, "query": ""}, 400, "query"),
    ("/v1/rerank", {**RERANK, "return_documents": "yes"}, 400, "return_documents"),
    ("/v1/rerank", {**RERANK, "rank_fields": ["text"]}, 400, "rank_fields"),
    ("/v1/rerank", {**RERANK, "model": "lm"}, 400, "model"),
    ("/v1/rerank", {**RERANK, "model": "nope"}, 404, "model"),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"]}, 400, "model"),
    ("/v1/score", {"model": "ce", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_2"),
    ("/v1/score", {"model": "ce", "text_1": ["a", "b"], "text_2": "c"}, 400, "text_2"),
    ("/v1/score", {"model": "ce", "text_1": [], "text_2": "c"}, 400, "text_1"),
    ("/v1/score", {"model": "ce", "text_1": "a", "text_2": [1]}, 400, "text_2"),
    ("/v1/score", {"model": "ce", "text_1": "a"}, 400, "text_2"),
    ("/v1/score", {"model": "ce", "text_1": "a", "text_2": "b", "encoding_format": "float"}, 400, "encoding_format"),
    ("/v1/embeddings", {"model": "ce", "input": "a"}, 400, "model"),
    ("/tokenize", {"model": "lm", "prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "messages"),
    ("/tokenize", {"model": "lm", "prompt": 3}, 400, "prompt"),
    ("/tokenize", {"model": "lm", "prompt": "a", "tools": []}, 400, "tools"),
    ("/tokenize", {"model": "ce", "prompt": "a"}, 400, "model"),
    ("/tokenize", {"model": "lm", "messages": [{"content": "a"}]}, 400, "messages"),
    ("/detokenize", {"model": "lm", "tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"model": "lm", "tokens": [1, 10 ** 6]}, 400, "tokens"),
    ("/detokenize", {"model": "lm", "tokens": [True]}, 400, "tokens"),
    ("/detokenize", {"model": "lm", "tokens": "1 2"}, 400, "tokens"),
])
def test_bad_requests_are_400s_naming_the_parameter(server, path, body, status, param):
    c, _ = server
    r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert c.post("/v1/rerank", json=RERANK).status_code == 200  # still serving


def test_other_kinds_name_their_endpoint_and_bad_bodies(server):
    c, _ = server
    r = c.post("/v1/completions", json={"model": "ce", "prompt": "x"})
    assert r.status_code == 400 and "/v1/rerank or /v1/score" in r.json()["error"]["message"]
    r = c.post("/v1/rerank", json={**RERANK, "model": "lm"})
    assert "/v1/completions" in r.json()["error"]["message"]
    assert c.post("/v1/score", content=b"{not json").status_code == 400
    assert c.get("/v1/rerank").status_code == 405
    assert "ce" in [m["id"] for m in c.get("/v1/models").json()["data"]]


def _metric(c, name: str) -> float:
    m = re.search(rf'^{name}{{model="ce"}} (\S+)$', c.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_concurrent_requests_are_batched_together(server):
    """64 one-pair requests from 16 threads: fewer forwards than requests means pairs of different
    requests shared forwards (each request has one pair)."""
    c, ref = server
    texts = sentences(64, seed=3)
    b0, p0 = _metric(c, "rtserve_score_batches_total"), _metric(c, "rtserve_score_pairs_total")

    def one(t):
        with httpx.Client(base_url=str(c.base_url), timeout=30) as own:
            return own.post("/v1/score", json={"model": "ce", "text_1": QUERY, "text_2": t}).json()

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, texts))
    batches = _metric(c, "rtserve_score_batches_total") - b0
    pairs = _metric(c, "rtserve_score_pairs_total") - p0
    assert pairs == 64
    assert batches < 64, "no forward took pairs of two requests"
    print(f"64 concurrent one-pair requests: {batches:.0f} forwards, {pairs / batches:.1f} pairs per forward")
    assert np.allclose([g["data"][0]["score"] for g in got], scores_of(ref, [(QUERY, t) for t in texts]), atol=1e-5)


def test_tokenize_detokenize_and_tokenizer_info(server):
    c, _ = server
    r = c.post("/tokenize", json={"model": "lm", "prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 64 and r["token_strs"] is None
    bare = c.post("/tokenize", json={"model": "lm", "prompt": "hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == [0] + bare["tokens"]  # <s> added, as the completions path encodes
    back = c.post("/detokenize", json={"model": "lm", "tokens": bare["tokens"]}).json()
    assert back == {"prompt": "hello world"}
    assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "<s>hello world"}
    msgs = [{"role": "user", "content": "hello world"}]
    chat = c.post("/tokenize", json={"model": "lm", "messages": msgs, "return_token_strs": True}).json()
    assert chat["token_strs"][0] == "<s>" and len(chat["token_strs"]) == chat["count"]
    usage = c.post("/v1/chat/completions", json={"model": "lm", "messages": msgs, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]  # what the chat path really encodes
    no_gen = c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert no_gen["count"] < chat["count"]
    info = c.get("/tokenizer_info", params={"model": "lm"}).json()
    assert info["vocab_size"] == 320 and info["max_model_len"] == 64 and "messages" in info["chat_template"]
    assert (info["bos_token"], info["bos_token_id"], info["eos_token"], info["eos_token_id"]) == ("<s>", 0, "</s>", 1)
    assert c.get("/tokenizer_info").json() == info  # the only language model served
    bad = c.get("/tokenizer_info", params={"model": "ce"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert c.get("/tokenizer_info", params={"model": "nope"}).status_code == 404


def test_health_and_version(server):
    c, _ = server
    assert c.get("/health").status_code == 200
    assert c.get("/version").json() == {"version": __version__}
    assert c.post("/health").status_code == 405
