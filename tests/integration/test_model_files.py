"""Files a model reads stay inside its folder and the repository: labels that climb out with '..'
or are absolute, symlinked model folders, model files, checkpoint files and shards pointing outside
are refused at load, with a reason naming the file; ``allow_symlinks`` (``rtserve serve
--allow-symlinks``, RTSERVE_ALLOW_SYMLINKS) lets operators link models in."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import httpx
import numpy as np
import orjson
import pytest

from models import AFFINE_YAML, write_model, write_random_llama, write_tiny_bert
from rtserve.config import ServerConfig
from rtserve.server.app import App
from servers import repository_index, serve_in_process  # noqa: E402

pytestmark = pytest.mark.timeout(120)
LM_YAML = "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 32\n  block_size: 4\n"
EMB_YAML = "backend: embedding\ndevice: cpu\nmax_batch_size: 4\n"
X = np.array([[1, 0, 0, 0], [0, 5, 0, 0]], np.float32)


serve = serve_in_process


index = repository_index


def infer_body(x: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]})


@pytest.fixture
def secret(tmp_path):
    """A file outside every repository, with lines a labels file would hand out."""
    f = tmp_path / "secret.txt"
    f.write_text("root:x:0:0\nhunter2\nthird line\n")
    return f


def labelled(repo, name, labels_line):
    return write_model(repo, name, "onnx", AFFINE_YAML.format(backend="onnx") + labels_line)


def test_labels_stay_inside_the_model_folder(affine_repo, tmp_path, secret):
    repo = tmp_path / "repo"
    shutil.copytree(affine_repo / "affine_labels", repo / "good")
    labelled(repo, "climbs", "labels: ../../secret.txt\n")  # repo/climbs -> tmp_path/secret.txt
    labelled(repo, "absolute", f"labels: {secret}\n")
    linked = labelled(repo, "linked", "labels: labels.txt\n")
    os.symlink(secret, linked / "labels.txt")

    async def fn(c):
        idx = await index(c)
        assert idx["good"]["state"] == "READY"
        r = await c.post("/v2/models/good/infer", content=infer_body(X))
        assert r.status_code == 200 and {o["name"]: o for o in r.json()["outputs"]}["label"]["data"] == ["bird", "dog"]
        for name, needle in (("climbs", "leaves"), ("absolute", "absolute path"), ("linked", "outside")):
            e = idx[name]
            assert e["state"] == "UNAVAILABLE", (name, e)
            assert f"model '{name}'" in e["reason"] and "labels" in e["reason"] and needle in e["reason"], e
            r = await c.post(f"/v2/models/{name}/infer", content=infer_body(X))
            assert r.status_code == 503 and "hunter2" not in r.text and "root:x" not in r.text

    serve(repo, fn)


def test_symlinked_model_folder_and_model_file_outside_the_repository(affine_repo, tmp_path):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    shutil.copytree(affine_repo / "affine_pt2", elsewhere / "affine")
    shutil.copytree(affine_repo / "affine_pt2", repo / "real")
    os.symlink(elsewhere / "affine", repo / "linked_folder")
    file_link = write_model(repo, "linked_file", "onnx", AFFINE_YAML.format(backend="onnx"))
    (file_link / "1" / "model.onnx").unlink()
    os.symlink(affine_repo / "affine" / "1" / "model.onnx", file_link / "1" / "model.onnx")
    # a link that stays inside the repository is fine
    inside = repo / "inside_link"
    (inside / "1").mkdir(parents=True)
    (inside / "model.yaml").write_text(AFFINE_YAML.format(backend="torch"))
    os.symlink(repo / "real" / "1" / "model.pt2", inside / "1" / "model.pt2")

    async def fn(c):
        idx = await index(c)
        assert idx["real"]["state"] == "READY" and idx["inside_link"]["state"] == "READY"
        e = idx["linked_folder"]
        assert e["state"] == "UNAVAILABLE" and "model 'linked_folder' folder" in e["reason"], e
        assert "outside" in e["reason"] and "--allow-symlinks" in e["reason"], e
        e = idx["linked_file"]
        assert e["state"] == "UNAVAILABLE" and "model.onnx" in e["reason"] and "outside" in e["reason"], e
        assert (await c.post("/v2/models/inside_link/infer", content=infer_body(X))).status_code == 200

    serve(repo, fn)

    async def opted_in(c):
        idx = await index(c)
        assert {idx[n]["state"] for n in ("real", "linked_folder", "linked_file", "inside_link")} == {"READY"}
        for n in ("linked_folder", "linked_file"):
            assert (await c.post(f"/v2/models/{n}/infer", content=infer_body(X))).status_code == 200

    serve(repo, opted_in, allow_symlinks=True)


def test_allow_symlinks_from_the_environment_and_the_cli(tmp_path, monkeypatch):
    from rtserve import cli
    from rtserve.server import runner

    monkeypatch.setenv("RTSERVE_ALLOW_SYMLINKS", "1")
    assert ServerConfig.from_env().allow_symlinks is True
    monkeypatch.delenv("RTSERVE_ALLOW_SYMLINKS")
    assert ServerConfig.from_env().allow_symlinks is False
    seen = []
    monkeypatch.setattr(runner, "serve", lambda config, app=None: seen.append(config))
    (tmp_path / "repo").mkdir()
    assert cli.main(["serve", "--repo", str(tmp_path / "repo"), "--allow-symlinks"]) == 0
    assert cli.main(["serve", "--repo", str(tmp_path / "repo")]) == 0
    assert [c.allow_symlinks for c in seen] == [True, False]
    assert App(seen[0]).repository.allow_symlinks is True


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    write_random_llama(path)
    return path


def _lm(repo, name, src):
    shutil.copytree(src, repo / name / "1")
    (repo / name / "model.yaml").write_text(LM_YAML)
    return repo / name / "1"


def test_llm_checkpoint_files_stay_inside_the_repository(llama_dir, tmp_path):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    shutil.copytree(llama_dir, elsewhere)
    _lm(repo, "lm", llama_dir)
    for name, fname in (("weights_out", "model.safetensors"), ("config_out", "config.json")):
        v = _lm(repo, name, llama_dir)
        (v / fname).unlink()
        os.symlink(elsewhere / fname, v / fname)
    v = _lm(repo, "shard_out", llama_dir)  # an index naming a shard outside the folder
    (v / "model.safetensors").rename(elsewhere / "shard.safetensors")
    (v / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../../../elsewhere/shard.safetensors"}}))
    v = _lm(repo, "version_out", llama_dir)  # the version folder itself is a link
    shutil.rmtree(v)
    os.symlink(elsewhere, v)

    async def fn(c):
        idx = await index(c)
        assert idx["lm"]["state"] == "READY", idx["lm"]
        for name, needle in (("weights_out", "model.safetensors"), ("config_out", "config.json"),
                             ("shard_out", "weight_map"), ("version_out", "outside")):
            e = idx[name]
            assert e["state"] == "UNAVAILABLE" and f"model '{name}' version 1" in e["reason"], e
            assert needle in e["reason"], e

    serve(repo, fn)


def test_embedding_checkpoint_files_stay_inside_the_repository(tmp_path):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    src = write_tiny_bert(tmp_path / "bert")
    shutil.copytree(src, elsewhere)
    (elsewhere / "1_Pooling").mkdir()
    (elsewhere / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    for name in ("emb", "tokenizer_out", "pooling_out"):
        shutil.copytree(src, repo / name / "1")
        (repo / name / "model.yaml").write_text(EMB_YAML)
    (repo / "tokenizer_out" / "1" / "tokenizer.json").unlink()
    os.symlink(elsewhere / "tokenizer.json", repo / "tokenizer_out" / "1" / "tokenizer.json")
    (repo / "pooling_out" / "1" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "../../../elsewhere/1_Pooling", "type": "sentence_transformers.models.Pooling"}]))

    async def fn(c):
        idx = await index(c)
        assert idx["emb"]["state"] == "READY", idx["emb"]
        e = idx["tokenizer_out"]
        assert e["state"] == "UNAVAILABLE" and "tokenizer.json" in e["reason"] and "outside" in e["reason"], e
        e = idx["pooling_out"]
        assert e["state"] == "UNAVAILABLE" and "Pooling" in e["reason"] and "leaves" in e["reason"], e
        r = await c.post("/v1/embeddings", json={"model": "emb", "input": "w1 w2"})
        assert r.status_code == 200, r.text

    serve(repo, fn)


def test_pipeline_stage_files_stay_inside(affine_repo, tmp_path):
    """A pipeline's stage files: '..' out of the version folder, or a link out of the repository."""
    repo = tmp_path / "repo"
    stage = {"input": "x", "output": "y"}
    for name, files in (("climbs", ["../../../elsewhere.onnx", "b.onnx"]), ("linked", ["a.onnx", "b.onnx"])):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "model.yaml").write_text("backend: pipeline\ndevice: cpu\nmax_batch_size: 8\n")
        (repo / name / "1" / "pipeline.json").write_text(json.dumps({"stages": [{**stage, "file": f} for f in files]}))
    os.symlink(affine_repo / "affine" / "1" / "model.onnx", repo / "linked" / "1" / "a.onnx")

    async def fn(c):
        idx = await index(c)
        e = idx["climbs"]
        assert e["state"] == "UNAVAILABLE" and "stage 0 'file'" in e["reason"] and "leaves" in e["reason"], e
        e = idx["linked"]
        assert e["state"] == "UNAVAILABLE" and "a.onnx" in e["reason"] and "outside" in e["reason"], e

    serve(repo, fn)
