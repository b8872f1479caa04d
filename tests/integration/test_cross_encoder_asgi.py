"""The cross-encoder kind in the repository, in process (httpx.ASGITransport): a reload under load
answers every request, and a checkpoint with a NaN in its classifier is refused naming the tensor."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("transformers")

from cross_encoders import write_tiny_cross_encoder  # noqa: E402
from models import set_weight  # noqa: E402
from servers import repository_index, serve_in_process  # noqa: E402

pytestmark = pytest.mark.timeout(120)
YAML = "backend: cross_encoder\ndevice: cpu\nmax_batch_size: 8\n"


def test_a_reload_under_load_answers_every_request(tmp_path):
    repo = tmp_path / "repo"
    write_tiny_cross_encoder(repo / "ce" / "1")
    (repo / "ce" / "model.yaml").write_text(YAML)

    async def fn(c):
        body = {"model": "ce", "text_1": "the quick fox", "text_2": ["a lazy dog", "snow falls"]}
        first = (await c.post("/v1/score", json=body)).json()["data"]

        async def client():
            return [(await c.post("/v1/score", json=body)) for _ in range(10)]

        tasks = [asyncio.ensure_future(client()) for _ in range(4)]
        await asyncio.sleep(0.01)
        reload = await c.post("/v2/repository/models/ce/load")
        answers = [r for t in tasks for r in await t]
        assert reload.status_code == 200, reload.text
        assert [r.status_code for r in answers] == [200] * 40
        for r in answers:  # same weights, same scores (to float32 rounding: batches differ)
            assert [d["score"] for d in r.json()["data"]] == pytest.approx([d["score"] for d in first], abs=1e-5)

    serve_in_process(repo, fn)


def test_nan_in_the_classifier_is_refused_naming_it(tmp_path):
    repo = tmp_path / "repo"
    for name in ("ce", "broken"):
        write_tiny_cross_encoder(repo / name / "1")
        (repo / name / "model.yaml").write_text(YAML)
    set_weight(repo / "broken" / "1", "classifier.weight", 3, float("nan"))

    async def fn(c):
        idx = await repository_index(c)
        assert idx["ce"]["state"] == "READY"
        e = idx["broken"]
        assert e["state"] == "UNAVAILABLE" and "classifier.weight" in e["reason"] and "NaN" in e["reason"], e
        r = await c.post("/v1/rerank", json={"model": "broken", "query": "q", "documents": ["d"]})
        assert r.status_code == 503 and r.json()["error"]["message"]

    serve_in_process(repo, fn)
