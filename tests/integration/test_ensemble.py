"""Ensembles (``backend: ensemble``): a DAG of model and function steps served as one KServe v2
model, with fan-out and fan-in; load-time errors name the step."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest
import torch

from models import AFFINE_YAML, expected, write_model
from rtserve.config import ServerConfig
from rtserve.server.app import App

ENSEMBLE = """\
backend: ensemble
max_batch_size: 8
inputs: [{name: x, datatype: FP32, shape: [4]}]
outputs:
  - {name: total, datatype: FP32, shape: [3]}
  - {name: probs, datatype: FP32, shape: [3]}
  - {name: top, datatype: INT64, shape: [1]}
steps:
"""
GOOD_STEPS = """\
  - {name: left, model: affine, inputs: {x: x}, outputs: {y: ya}}
  - {name: right, model: affine_pt2, inputs: {x: x}, outputs: {y: yb}}
  - {name: join, model: add, inputs: {a: ya, b: yb}, outputs: {s: total}}
  - {name: probs, function: softmax, inputs: {x: ya}, outputs: {y: probs}}
  - {name: top, function: argmax, inputs: {x: total}, outputs: {y: top}}
"""


class Add(torch.nn.Module):
    def forward(self, a, b):
        return a + b


@pytest.fixture()
def repo(tmp_path):
    from rtserve.export.torch_export import export_onnx

    write_model(tmp_path, "affine", "onnx", AFFINE_YAML.format(backend="onnx"))
    write_model(tmp_path, "affine_pt2", "torch", AFFINE_YAML.format(backend="torch"))
    (tmp_path / "add").mkdir()
    (tmp_path / "add" / "model.yaml").write_text(AFFINE_YAML.format(backend="onnx"))
    export_onnx(Add(), (torch.zeros(2, 3), torch.zeros(2, 3)), tmp_path / "add" / "1" / "model.onnx", ["a", "b"], ["s"])
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "model.yaml").write_text(ENSEMBLE + GOOD_STEPS)
    return tmp_path


async def _with_app(repo, fn):
    app = App(ServerConfig(repository=str(repo)))
    await app.startup()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await fn(c, app)
    finally:
        await app.shutdown()


def body(x: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]})


def outputs(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def test_fan_out_fan_in_and_functions_compute_the_graph(repo):
    x = np.array([[1, 2, 3, 4], [0, 1, 0, 1]], np.float32)

    async def main(c, app):
        meta = (await c.get("/v2/models/ens")).json()
        assert meta["platform"] == "ensemble" and [i["name"] for i in meta["inputs"]] == ["x"]
        out = outputs(await c.post("/v2/models/ens/infer", content=body(x)))
        y = expected(x)
        np.testing.assert_allclose(out["total"], 2 * y, rtol=1e-6)
        e = np.exp(y - y.max(1, keepdims=True))
        np.testing.assert_allclose(out["probs"], e / e.sum(1, keepdims=True), rtol=1e-5)
        assert out["top"].reshape(-1).tolist() == (2 * y).argmax(1).tolist()
        # many at once: every answer is its own, while the step models batch them with each other
        xs = [np.full((1, 4), i, np.float32) for i in range(16)]
        rs = await asyncio.gather(*[c.post("/v2/models/ens/infer", content=body(v)) for v in xs])
        for v, r in zip(xs, rs):
            np.testing.assert_allclose(outputs(r)["total"], 2 * expected(v), rtol=1e-6)
        bad = await c.post("/v2/models/ens/infer", content=body(np.zeros((1, 5), np.float32)))
        assert bad.status_code == 400 and "shape" in bad.json()["error"]
        assert (await c.get("/v2/models/affine/ready")).status_code == 200  # the steps still serve alone

    asyncio.run(_with_app(repo, main))


@pytest.mark.parametrize("steps,needle", [
    ("  - {name: a, model: affine, inputs: {x: x}, outputs: {y: p}}\n"
     "  - {name: b, model: add, inputs: {a: p, b: q}, outputs: {s: q}}\n", "cycle: 'b'"),
    ("  - {name: a, model: nope, inputs: {x: x}, outputs: {y: total}}\n", "step 'a': model 'nope'"),
    ("  - {name: a, model: affine, inputs: {x: x}, outputs: {y: p}}\n"
     "  - {name: b, model: affine, inputs: {x: p}, outputs: {y: total}}\n", "step 'b': input 'x' needs FP32 [4]"),
    ("  - {name: a, model: add, inputs: {a: x}, outputs: {s: total}}\n", "step 'a': model 'add' input 'b' is not mapped"),
    ("  - {name: a, model: affine, inputs: {x: x}, outputs: {y: total}}\n"
     "  - {name: b, function: cube, inputs: {x: total}, outputs: {y: probs}}\n", "function 'cube' is not one of"),
    ("  - {name: a, model: affine, inputs: {x: x}, outputs: {y: total}}\n", "output 'probs': no step produces it"),
    ("  - {name: a, model: affine, inputs: {x: nowhere}, outputs: {y: total}}\n", "reads tensor 'nowhere'"),
    ("  - {name: a, model: affine, inputs: {x: x}, outputs: {y: total}}\n"
     "  - {name: b, model: affine_pt2, inputs: {x: x}, outputs: {y: total}}\n", "already produced by step 'a'"),
])
def test_bad_graphs_fail_at_load_naming_the_step(repo, steps, needle):
    (repo / "ens" / "model.yaml").write_text(ENSEMBLE + steps)

    async def main(c, app):
        index = (await c.post("/v2/repository/index")).json()
        reason = next(m["reason"] for m in index if m["name"] == "ens")
        assert needle in reason, reason
        assert (await c.get("/v2/models/ens/ready")).status_code != 200
        assert (await c.get("/v2/models/affine/ready")).status_code == 200  # the rest keep serving

    asyncio.run(_with_app(repo, main))


def test_inputs_are_checked_against_the_ensemble_before_their_data_is_converted(repo):
    def doc(name="x", datatype="FP32", shape=(100_000, 4), data=None):
        n = int(np.prod(shape))
        data = data if data is not None else [0.0] * (n - 1) + ["x"]  # the last element is not a number
        return orjson.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]})

    async def main(c, app):
        cases = [
            (doc(), "model 'ens': batch size 100000 exceeds max_batch_size 8"),
            (doc(shape=(0, 4), data=[]), "batch size must be at least 1"),
            (doc(name="image", shape=(1, 4)), "unknown input 'image'"),
            (doc(datatype="INT32", shape=(1, 4)), "datatype INT32, the model takes FP32"),
            (doc(shape=(2, 5)), "shape [2, 5], the model takes [-1, 4]"),
            (doc(shape=(1, 4)), "element 3 is str 'x', not a number"),  # a valid shape: now the data
        ]
        for body_, needle in cases:
            r = await c.post("/v2/models/ens/infer", content=body_)
            assert r.status_code == 400 and needle in r.json()["error"], (needle, r.text)
        ok = await c.post("/v2/models/ens/infer", content=body(np.ones((1, 4), np.float32)))
        assert ok.status_code == 200

    asyncio.run(_with_app(repo, main))
