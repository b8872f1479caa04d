"""Every model loads in isolation: whatever fails while loading one (a half-written checkpoint, an
exception from a runtime, out of memory) leaves it UNAVAILABLE with a reason naming the model, the
version, the file and the error, while the server starts and serves the rest; a later load retries,
and a failed reload keeps serving. Checkpoints that cannot work (a context longer than their
positions, NaN or infinite weights) are refused at load; unloads are logged."""
from __future__ import annotations

import asyncio
import logging
import shutil

import httpx
import numpy as np
import orjson
import pytest

from models import AFFINE_YAML, set_weight, write_model, write_random_llama, write_tiny_bert
from rtserve.config import ServerConfig
from rtserve.server.app import App
from servers import repository_index, serve_in_process  # noqa: E402

pytestmark = pytest.mark.timeout(120)
LM_YAML = "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 32\n  block_size: 4\n"
EMB_YAML = "backend: embedding\ndevice: cpu\nmax_batch_size: 4\n"
X = np.array([[1, 2, 3, 4]], np.float32)


serve = serve_in_process


index = repository_index


def infer_body(x: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    write_random_llama(path)
    return path


def lm_repo(tmp_path, affine_repo, llama_dir, yaml_text=LM_YAML):
    """A repository with a good tensor model and an LLM copied from ``llama_dir``; returns (repo, lm version dir)."""
    repo = tmp_path / "repo"
    shutil.copytree(affine_repo / "affine_pt2", repo / "good")
    shutil.copytree(llama_dir, repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text(yaml_text)
    return repo, repo / "lm" / "1"


def half_written(v):
    """Cut ``v``'s model.safetensors inside its header (a copy still in progress); returns the whole bytes."""
    whole = (v / "model.safetensors").read_bytes()
    (v / "model.safetensors").write_bytes(whole[:50])
    return whole


def test_half_written_checkpoint_at_startup(affine_repo, llama_dir, tmp_path, caplog):
    repo, v = lm_repo(tmp_path, affine_repo, llama_dir)
    whole = half_written(v)

    async def fn(c):
        # the server started and serves the rest
        assert (await c.post("/v2/models/good/infer", content=infer_body(X))).status_code == 200
        e = (await index(c))["lm"]
        assert e["state"] == "UNAVAILABLE", e
        for needle in ("model 'lm' version 1", "model.safetensors", "SafetensorError"):
            assert needle in e["reason"], (needle, e)
        r = await c.post("/v1/completions", json={"model": "lm", "prompt": [1, 2], "max_tokens": 1})
        assert r.status_code == 503 and "SafetensorError" in r.text, r.text
        # the file is whole again: a later load retries and serves
        (v / "model.safetensors").write_bytes(whole)
        assert (await c.post("/v2/repository/models/lm/load")).status_code == 200
        assert (await index(c))["lm"]["state"] == "READY"

    with caplog.at_level(logging.ERROR, logger="rtserve.repository"):
        serve(repo, fn)
    assert any("model 'lm'" in r.getMessage() and "SafetensorError" in r.getMessage() for r in caplog.records)


def test_half_written_checkpoint_on_hot_load_never_sticks_in_loading(affine_repo, llama_dir, tmp_path):
    repo, v = lm_repo(tmp_path, affine_repo, llama_dir)
    shutil.move(repo / "lm", tmp_path / "lm")  # copied in while the server runs

    async def fn(c):
        shutil.move(tmp_path / "lm", repo / "lm")
        whole = half_written(v)
        r = await c.post("/v2/repository/models/lm/load")
        assert r.status_code == 400, r.text  # a model file that cannot be used: named, with the error
        for needle in ("model 'lm' version 1", "model.safetensors", "SafetensorError"):
            assert needle in r.json()["error"], (needle, r.text)
        assert (await index(c))["lm"]["state"] == "UNAVAILABLE"
        assert (await c.post("/v2/repository/models/lm/unload")).status_code == 404
        assert (await c.post("/v2/models/good/infer", content=infer_body(X))).status_code == 200
        (v / "model.safetensors").write_bytes(whole)
        assert (await c.post("/v2/repository/models/lm/load")).status_code == 200
        assert (await index(c))["lm"]["state"] == "READY"

    serve(repo, fn)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), MemoryError(),
                                   OSError(5, "Input/output error")])
def test_any_exception_while_loading_leaves_the_model_unavailable(affine_repo, tmp_path, monkeypatch, caplog, error):
    """A failure that is not the configuration's: the model is UNAVAILABLE, its reason and the hot
    load's 500 name model, version and error, the traceback is logged; a later load retries."""
    from rtserve.models.tensor import TensorModel

    repo = tmp_path / "repo"
    shutil.copytree(affine_repo / "affine", repo / "good")
    shutil.copytree(affine_repo / "affine_pt2", repo / "flaky")
    load = TensorModel.load.__func__

    def failing(cls, config, model_dir, version, ctx):
        if config.name == "flaky":
            raise error
        return load(cls, config, model_dir, version, ctx)

    monkeypatch.setattr(TensorModel, "load", classmethod(failing))
    kind = type(error).__name__

    async def fn(c):
        assert (await c.post("/v2/models/good/infer", content=infer_body(X))).status_code == 200
        e = (await index(c))["flaky"]
        assert e["state"] == "UNAVAILABLE" and "model 'flaky' version 1" in e["reason"] and kind in e["reason"], e
        r = await c.post("/v2/repository/models/flaky/load")
        assert r.status_code == 500, r.text
        assert "model 'flaky' version 1" in r.json()["error"] and kind in r.json()["error"], r.text
        assert (await index(c))["flaky"]["state"] == "UNAVAILABLE"
        r = await c.post("/v2/models/flaky/infer", content=infer_body(X))
        assert r.status_code == 503 and kind in r.json()["error"], r.text
        monkeypatch.setattr(TensorModel, "load", classmethod(load))
        assert (await c.post("/v2/repository/models/flaky/load")).status_code == 200
        assert (await c.post("/v2/models/flaky/infer", content=infer_body(X))).status_code == 200

    with caplog.at_level(logging.ERROR, logger="rtserve.repository"):
        serve(repo, fn)
    logged = [r for r in caplog.records if "model 'flaky'" in r.getMessage()]
    assert logged and all(r.exc_info for r in logged)


def test_a_failed_reload_keeps_serving_the_loaded_versions(affine_repo, tmp_path, monkeypatch):
    from rtserve.models.tensor import TensorModel

    repo = tmp_path / "repo"
    shutil.copytree(affine_repo / "affine", repo / "affine")

    async def fn(c):
        def broken(cls, config, model_dir, version, ctx):
            raise RuntimeError("the runtime fell over")

        monkeypatch.setattr(TensorModel, "load", classmethod(broken))
        r = await c.post("/v2/repository/models/affine/load")
        assert r.status_code == 500 and "model 'affine'" in r.json()["error"], r.text
        e = (await index(c))["affine"]
        assert e["state"] == "READY" and "reload failed" in e["reason"] and "RuntimeError" in e["reason"], e
        assert (await c.post("/v2/models/affine/infer", content=infer_body(X))).status_code == 200
        monkeypatch.undo()
        assert (await c.post("/v2/repository/models/affine/load")).status_code == 200
        assert (await index(c))["affine"]["reason"] == ""

    serve(repo, fn)


def test_max_model_len_above_the_checkpoint_positions_is_refused(affine_repo, llama_dir, tmp_path):
    repo, _ = lm_repo(tmp_path, affine_repo, llama_dir, LM_YAML + "  max_model_len: 512\n")

    async def fn(c):
        e = (await index(c))["lm"]
        assert e["state"] == "UNAVAILABLE", e
        assert "max_model_len 512" in e["reason"] and "max_position_embeddings 256" in e["reason"], e

    serve(repo, fn)


@pytest.mark.parametrize("tensor,element,value", [
    ("model.layers.1.mlp.down_proj.weight", 17, float("nan")),
    ("model.norm.weight", 5, float("inf")),
])
def test_llm_weights_with_nan_or_inf_are_refused(affine_repo, llama_dir, tmp_path, tensor, element, value):
    repo, v = lm_repo(tmp_path, affine_repo, llama_dir)
    set_weight(v, tensor, element, value)
    bad = "NaN" if value != value else "infinite"

    async def fn(c):
        e = (await index(c))["lm"]
        assert e["state"] == "UNAVAILABLE" and tensor in e["reason"] and bad in e["reason"], e
        assert "model 'lm' version 1" in e["reason"] and "model.safetensors" in e["reason"], e

    serve(repo, fn)



def test_embedding_weights_with_nan_are_refused(tmp_path):
    repo = tmp_path / "repo"
    for name in ("emb", "broken"):
        write_tiny_bert(repo / name / "1")
        (repo / name / "model.yaml").write_text(EMB_YAML)
    set_weight(repo / "broken" / "1", "encoder.layer.0.attention.self.query.weight", 3, float("nan"))

    async def fn(c):
        idx = await index(c)
        assert idx["emb"]["state"] == "READY"
        e = idx["broken"]
        assert e["state"] == "UNAVAILABLE" and "query.weight" in e["reason"] and "NaN" in e["reason"], e

    serve(repo, fn)


def test_large_tensors_are_checked_on_an_evenly_spaced_sample():
    import torch

    from rtserve.llm.weights import FULL_CHECK_ELEMENTS, SAMPLE_ELEMENTS, check_finite

    small = torch.zeros(FULL_CHECK_ELEMENTS - 1)
    small[12345] = float("nan")  # a small tensor is checked whole
    with pytest.raises(ValueError, match="t has NaN"):
        check_finite(small, "t")
    big = torch.zeros(4 * FULL_CHECK_ELEMENTS, dtype=torch.bfloat16)
    big[-1] = float("inf")  # the last element is always sampled
    with pytest.raises(ValueError, match="infinite"):
        check_finite(big, "t")
    big[-1] = 0
    step = (big.numel() - 1) // (SAMPLE_ELEMENTS - 1)
    big[step // 2] = float("nan")  # between two samples: a sample cannot prove a large tensor clean
    check_finite(big, "t")
    check_finite(torch.full((3,), 7, dtype=torch.int8), "ints")  # integers have no NaN


def test_nan_in_warm_up_outputs_is_a_logged_hint(tmp_path, caplog):
    """A tensor model answering NaN for all-zero inputs (here y = x / x) still loads: it may be
    right to (log, normalisation); the warning names the model and output."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Div", ["x", "x"], ["y"])], "div",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "repo" / "ratio" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "repo" / "ratio" / "1" / "model.onnx"))
    (tmp_path / "repo" / "ratio" / "model.yaml").write_text(AFFINE_YAML.format(backend="onnx"))

    async def fn(c):
        assert (await index(c))["ratio"]["state"] == "READY"

    with caplog.at_level(logging.WARNING):
        serve(tmp_path / "repo", fn)
    assert any("model 'ratio'" in r.getMessage() and "warm-up outputs y" in r.getMessage() and "NaN" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_unloads_are_logged(affine_repo, tmp_path, caplog):
    repo = tmp_path / "repo"
    write_model(repo, "affine", "onnx", AFFINE_YAML.format(backend="onnx") + "version_policy: all\n", versions=(1, 2))

    async def fn(c):
        assert (await c.post("/v2/repository/models/affine/unload")).status_code == 200

    with caplog.at_level(logging.INFO, logger="rtserve.repository"):
        serve(repo, fn)
    assert "unloaded model 'affine' versions [1, 2]" in [r.getMessage() for r in caplog.records]
