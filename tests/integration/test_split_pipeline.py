"""``rtserve split`` writes a pipeline repository model that serves (stages in worker processes or
in process, micro-batches) the same outputs as the unsplit model; a dead stage worker is a 503."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import numpy as np
import orjson
import pytest
import torch

from rtserve.cli import main
from rtserve.spec.model import SpecModel, save_spec_model
from rtserve.config import ServerConfig
from rtserve.demo import digits_cnn
from rtserve.server.app import App


@pytest.fixture()
def spec(tmp_path):
    torch.manual_seed(0)
    model = digits_cnn().eval()
    save_spec_model(SpecModel(model, (1, 8, 8), "image", "logits"), tmp_path / "spec")
    return tmp_path, model


def body(x):
    return orjson.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]})


@pytest.mark.parametrize("executor,fmt", [("local", "onnx"), ("process", "onnx"), ("local", "pt2")])
def test_split_model_serves_the_unsplit_outputs(spec, capsys, executor, fmt):
    tmp, model = spec
    repo = tmp / "repo"
    assert main(["split", str(tmp / "spec"), "--stages", "3", "--balance", "flops", "--executor", executor,
                 "--micro-batch", "4", "--format", fmt, "--out", str(repo / "digits_split")]) == 0
    printed = capsys.readouterr().out
    assert "crosses to the next stage" in printed and "verified" in printed
    pipe = json.loads((repo / "digits_split" / "1" / "pipeline.json").read_text())
    assert len(pipe["stages"]) == 3 and {s["executor"] for s in pipe["stages"]} == {executor}
    assert all(s["file"].endswith("." + fmt) for s in pipe["stages"])
    x = np.random.default_rng(1).random((13, 1, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()

    async def run():
        app = App(ServerConfig(repository=str(repo)))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post("/v2/models/digits_split/infer", content=body(x))
                assert r.status_code == 200, r.text
                got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(13, 10)
                np.testing.assert_allclose(got, want, atol=1e-5)
                rs = await asyncio.gather(*[c.post("/v2/models/digits_split/infer", content=body(x[i:i + 1]))
                                            for i in range(13)])
                for i, r in enumerate(rs):
                    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]), want[i], atol=1e-5)
                if executor == "process":  # kill a stage's worker: that batch is a 503, the next ones work
                    backend = app.repository.get("digits_split").instances[0]
                    os.kill(backend.stages[1].proc.pid, signal.SIGKILL)
                    await asyncio.sleep(0.2)
                    r = await c.post("/v2/models/digits_split/infer", content=body(x))
                    assert r.status_code == 503, r.text
                    r = await c.post("/v2/models/digits_split/infer", content=body(x))
                    assert r.status_code == 200
        finally:
            await app.shutdown()

    asyncio.run(run())


def test_split_errors_before_writing(spec, capsys):
    tmp, _ = spec
    assert main(["split", str(tmp / "spec"), "--stages", "20", "--out", str(tmp / "o")]) == 2
    assert "only 9 layers" in capsys.readouterr().err and not (tmp / "o").exists()


def test_split_transformer_program_serves_over_kserve(tmp_path, capsys):
    """A BERT encoder exported with ``rtserve convert`` (dynamic batch and sequence) cut into 2
    stages in worker processes: the attention mask crosses the cut beside the hidden states, and
    the served embeddings equal the whole program's."""
    transformers = pytest.importorskip("transformers")
    from rtserve.export.convert import convert

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(tmp_path / "bert")
    convert(tmp_path / "bert", "pt2", tmp_path / "bert.pt2")
    repo = tmp_path / "repo"
    assert main(["split", str(tmp_path / "bert.pt2"), "--stages", "2", "--balance", "flops", "--format", "onnx",
                 "--executor", "process", "--out", str(repo / "bert_split")]) == 0
    printed = capsys.readouterr().out
    assert "bert.encoder.layer" in printed and "verified" in printed
    stages = json.loads((repo / "bert_split" / "1" / "pipeline.json").read_text())["stages"]
    assert len(stages[1]["inputs"]) >= 2  # hidden states and the mask, at least
    ids = np.array([[5, 9, 33, 2, 7, 1, 4], [8, 8, 1, 0, 0, 0, 0], [3, 2, 1, 9, 0, 0, 0]], np.int64)
    mask = (ids > 0).astype(np.int64)
    whole = torch.export.load(str(tmp_path / "bert.pt2")).module()
    with torch.no_grad():
        want = whole(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    async def run():
        app = App(ServerConfig(repository=str(repo)))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                doc = {"inputs": [{"name": n, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
                                  for n, v in (("input_ids", ids), ("attention_mask", mask))]}
                r = await c.post("/v2/models/bert_split/infer", content=orjson.dumps(doc))
                assert r.status_code == 200, r.text
                out = r.json()["outputs"][0]
                assert out["name"] == "sentence_embedding"
                np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(want.shape), want, atol=1e-5)
        finally:
            await app.shutdown()

    asyncio.run(run())
