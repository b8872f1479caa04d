"""The KServe v2 API in-process (httpx.ASGITransport): routes, codecs, errors, repository API."""
from __future__ import annotations

import asyncio
import gzip
import shutil

import httpx
import numpy as np
import orjson
import pytest

from models import AFFINE_YAML, expected, write_model
from rtserve.config import ServerConfig
from rtserve.server.app import App


def run(coro):
    return asyncio.run(coro)


async def _with_app(repo, fn, **cfg):
    app = App(ServerConfig(repository=str(repo), **cfg))
    await app.startup()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await fn(c, app)
    finally:
        await app.shutdown()


def infer_body(x: np.ndarray, name="x", **extra) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}], **extra})


X = np.array([[1, 2, 3, 4], [0, 1, 0, 1], [2, 2, 2, 2]], dtype=np.float32)


def test_health_metadata_and_infer_json(affine_repo):
    async def fn(c, app):
        assert (await c.get("/v2/health/live")).status_code == 200
        assert (await c.get("/v2/health/ready")).status_code == 200
        meta = (await c.get("/v2")).json()
        assert meta["name"] == "rtserve" and "binary_tensor_data" in meta["extensions"]
        m = (await c.get("/v2/models/affine")).json()
        assert m["versions"] == ["2"] and m["platform"] == "onnxruntime_onnx"
        assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert m["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
        for model in ("affine", "affine_pt2"):
            r = await c.post(f"/v2/models/{model}/infer", content=infer_body(X, id="req-7"))
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["id"] == "req-7" and doc["model_name"] == model
            (out,) = doc["outputs"]
            assert out["name"] == "y" and out["shape"] == [3, 3] and out["datatype"] == "FP32"
            np.testing.assert_allclose(np.array(out["data"]).reshape(3, 3), expected(X), rtol=1e-6)
        assert (await c.get("/v2/models/affine/ready")).status_code == 200
        assert (await c.get("/v2/models/affine/versions/2/ready")).status_code == 200

    run(_with_app(affine_repo, fn))


def test_binary_tensors_in_and_out(affine_repo):
    async def fn(c, app):
        header = orjson.dumps({
            "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "parameters": {"binary_data_size": X.nbytes}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
        r = await c.post("/v2/models/affine/infer", content=header + X.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        doc = orjson.loads(r.content[:n])
        size = doc["outputs"][0]["parameters"]["binary_data_size"]
        y = np.frombuffer(r.content[n:n + size], dtype=np.float32).reshape(3, 3)
        np.testing.assert_allclose(y, expected(X))

    run(_with_app(affine_repo, fn))


def test_versions_and_policy(affine_repo):
    async def fn(c, app):
        # the policy serves the latest 1 version: v2 is served, v1 is not
        r = await c.post("/v2/models/affine/versions/2/infer", content=infer_body(X[:1]))
        assert r.status_code == 200 and r.json()["model_version"] == "2"
        r = await c.post("/v2/models/affine/versions/1/infer", content=infer_body(X[:1]))
        assert r.status_code == 404 and "no version '1'" in r.json()["error"]

    run(_with_app(affine_repo, fn))


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"inputs": []}', "non-empty 'inputs'"),
    (infer_body(X, name="z"), "unknown input 'z'"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}), "must be FP32"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1] * 5}]}), "does not match"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1] * 5}]}), "needs 8 elements"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP99", "data": [1] * 4}]}), "unsupported datatype"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]}), "not a valid FP32"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [-1, 4], "datatype": "FP32", "data": [1] * 4}]}), "non-negative"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [9, 4], "datatype": "FP32", "data": [1] * 36}]}), "exceeds max_batch_size"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}]}), "at least 1"),
    (infer_body(X, outputs=[{"name": "nope"}]), "unknown output 'nope'"),
    (infer_body(X, parameters={"priority": 7}), "priority 7"),
    (infer_body(X, parameters={"timeout": -5}), "'timeout'"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, None, 3, 4]}]}),
     "input 'x': data is not a valid FP32 array: element 1 is null"),
    (infer_body(X, outputs=[{"name": "y"}, {"name": "y"}]), "output 'y' is requested twice"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [100_000, 4], "datatype": "FP32",
                               "data": [0.0] * 399_999 + ["x"]}]}),
     "model 'affine': batch size 100000 exceeds max_batch_size 8"),
    (orjson.dumps({"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, None, 4]}]}),
     "unknown input 'z'"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3.5, 4]}]}),
     "input 'x' must be FP32"),
])
def test_bad_requests_get_400_naming_the_problem(affine_repo, body, needle):
    async def fn(c, app):
        r = await c.post("/v2/models/affine/infer", content=body)
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]
        ok = await c.post("/v2/models/affine/infer", content=infer_body(X))
        assert ok.status_code == 200  # the server keeps serving

    run(_with_app(affine_repo, fn))


def test_binary_section_mismatch(affine_repo):
    async def fn(c, app):
        header = orjson.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 40}}]})
        r = await c.post("/v2/models/affine/infer", content=header + b"\0" * 40,
                         headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 400 and "does not match shape" in r.json()["error"]
        r = await c.post("/v2/models/affine/infer", content=header + b"\0" * 10,
                         headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 400 and "runs past the end" in r.json()["error"]
        r = await c.post("/v2/models/affine/infer", content=header,
                         headers={"Inference-Header-Content-Length": str(len(header) + 50)})
        assert r.status_code == 400 and "outside the body" in r.json()["error"]
        good = orjson.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 48}}]})
        r = await c.post("/v2/models/affine/infer", content=good + X.tobytes() + b"extra",
                         headers={"Inference-Header-Content-Length": str(len(good))})
        assert r.status_code == 400 and "binary section holds" in r.json()["error"]

    run(_with_app(affine_repo, fn))


def test_unknown_routes_methods_and_models(affine_repo):
    async def fn(c, app):
        assert (await c.get("/v2/models/nope")).status_code == 404
        r = await c.post("/v2/models/nope/infer", content=infer_body(X))
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
        assert (await c.get("/v2/models/affine/infer")).status_code == 405
        assert (await c.get("/v3/anything")).status_code == 404
        assert (await c.get("/v2/models/affine/versions/abc")).status_code == 404

    run(_with_app(affine_repo, fn))


def test_body_limit_and_compression(affine_repo):
    async def fn(c, app):
        big = infer_body(np.zeros((8, 4), np.float32)) + b" " * 5000
        r = await c.post("/v2/models/affine/infer", content=big)
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
        r = await c.post("/v2/models/affine/infer", content=gzip.compress(infer_body(X)),
                         headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200
        bomb = gzip.compress(b" " * 100_000)
        r = await c.post("/v2/models/affine/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413
        r = await c.post("/v2/models/affine/infer", content=b"xx", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400
        r = await c.post("/v2/models/affine/infer", content=infer_body(X), headers={"Content-Encoding": "br"})
        assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]

    run(_with_app(affine_repo, fn, max_body_bytes=4096))


def test_labels_and_classification(affine_repo):
    async def fn(c, app):
        x = np.array([[1, 0, 0, 0], [0, 5, 0, 0]], np.float32)  # y rows: [1.5,-1,4] -> bird, [.5,4,2] -> dog
        r = await c.post("/v2/models/affine_labels/infer", content=infer_body(x))
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["label"]["data"] == ["bird", "dog"] and outs["label"]["datatype"] == "BYTES"
        r = await c.post("/v2/models/affine_labels/infer", content=infer_body(
            x, outputs=[{"name": "y", "parameters": {"classification": 2}}]))
        (out,) = r.json()["outputs"]
        assert out["shape"] == [2, 2]
        assert out["data"][0] == "4.000000:2:bird" and out["data"][1] == "1.500000:0:cat"

    run(_with_app(affine_repo, fn))


def test_repository_api_hot_unload_load_and_api_key(affine_repo):
    async def fn(c, app):
        r = await c.post("/v2/repository/index")
        assert r.status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        idx = (await c.post("/v2/repository/index", headers=auth)).json()
        assert {"name": "affine", "version": "2", "state": "READY", "reason": ""} in idx
        assert (await c.post("/v2/repository/models/affine/unload", headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await c.post("/v2/repository/models/affine/unload", headers=auth)).status_code == 200
        assert (await c.get("/v2/models/affine/ready")).status_code == 503
        r = await c.post("/v2/models/affine/infer", content=infer_body(X))
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        # other models serve on
        assert (await c.post("/v2/models/affine_pt2/infer", content=infer_body(X))).status_code == 200
        assert (await c.post("/v2/repository/models/affine/load", headers=auth)).status_code == 200
        assert (await c.post("/v2/models/affine/infer", content=infer_body(X))).status_code == 200
        assert (await c.post("/v2/repository/models/ghost/load", headers=auth)).status_code == 404
        assert (await c.post("/v2/repository/models/ghost/unload", headers=auth)).status_code == 404
        r = await c.post("/v2/repository/models/%2e%2e/load", headers=auth)
        assert r.status_code in (400, 404) and "affine" not in r.text
        r = await c.post("/v2/repository/models/..%2fetc/load", headers=auth)
        assert r.status_code in (400, 404)

    run(_with_app(affine_repo, fn, api_key="k3y"))


def test_a_request_that_reaches_a_reloaded_version_is_served_by_the_new_one(affine_repo):
    """Found by benchmarks/soak.py: a request that looked the model up before a reload and reached it
    after the old version closed answered 503 ("not serving"); the replacement serves it now. An
    unloaded model has no replacement and still answers 503."""
    from rtserve.errors import Unavailable
    from rtserve.models.base import TensorRequest

    async def fn(c, app):
        old = app.repository.get("affine")
        await app.repository.load("affine")
        assert app.repository.get("affine") is not old  # a new version object; the old one is closed
        out = await old.infer(TensorRequest({"x": X}))
        np.testing.assert_allclose(out["y"], expected(X), rtol=1e-5)
        current = app.repository.get("affine")
        await app.repository.unload("affine")
        with pytest.raises(Unavailable):
            await current.infer(TensorRequest({"x": X}))

    run(_with_app(affine_repo, fn))


def test_protected_inference(affine_repo):
    async def fn(c, app):
        assert (await c.post("/v2/models/affine/infer", content=infer_body(X))).status_code == 401
        r = await c.post("/v2/models/affine/infer", content=infer_body(X), headers={"X-API-Key": "k"})
        assert r.status_code == 200
        assert (await c.get("/v2/health/ready")).status_code == 200  # health stays open

    run(_with_app(affine_repo, fn, api_key="k", protect_inference=True))


def test_metrics_and_openapi(affine_repo):
    async def fn(c, app):
        for _ in range(3):
            await c.post("/v2/models/affine/infer", content=infer_body(X))
        await c.post("/v2/models/affine/infer", content=b"{")
        text = (await c.get("/metrics")).text
        assert 'rtserve_inference_request_success_total{model="affine",version="2"} 3' in text
        assert 'rtserve_inference_request_failure_total{model="affine",version="2",reason="invalid_input"} 1' in text
        assert 'rtserve_inference_count_total{model="affine",version="2"} 9' in text
        for fam in ("rtserve_request_duration_seconds_bucket", "rtserve_queue_duration_seconds_bucket",
                    "rtserve_compute_duration_seconds_bucket", "rtserve_batch_size_bucket", "rtserve_queue_depth"):
            assert f'{fam}{{model="affine",version="2"' in text, fam
        doc = (await c.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.") and "/v2/models/{model}/infer" in doc["paths"]

    run(_with_app(affine_repo, fn))


def test_broken_models_do_not_stop_the_others(affine_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(affine_repo / "affine_pt2", repo / "good")
    (repo / "bad_yaml").mkdir()
    (repo / "bad_yaml" / "model.yaml").write_text("backend: onnx\nmax_batch_size: [\n")
    (repo / "bad_key").mkdir()
    (repo / "bad_key" / "model.yaml").write_text("backend: onnx\nmax_bacth_size: 4\n")
    (repo / "bad_file" / "1").mkdir(parents=True)
    (repo / "bad_file" / "model.yaml").write_text("backend: onnx\n")
    (repo / "bad_file" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    write_model(repo, "bad_shape", "onnx", AFFINE_YAML.format(backend="onnx") +
                "inputs:\n  - {name: x, datatype: FP32, shape: [5]}\n")

    async def fn(c, app):
        assert (await c.post("/v2/models/good/infer", content=infer_body(X))).status_code == 200
        idx = {e["name"]: e for e in (await c.post("/v2/repository/index")).json()}
        assert idx["good"]["state"] == "READY"
        assert "not valid YAML" in idx["bad_yaml"]["reason"] and "model.yaml" in idx["bad_yaml"]["reason"]
        assert "unknown key 'max_bacth_size'" in idx["bad_key"]["reason"]
        assert "bad_file" in idx["bad_file"]["reason"] and "model.onnx" in idx["bad_file"]["reason"]
        assert "input 'x' has shape [4] in the model file, model.yaml says [5]" in idx["bad_shape"]["reason"]
        r = await c.post("/v2/repository/models/bad_key/load")
        assert r.status_code == 400 and "max_bacth_size" in r.json()["error"]
        r = await c.post("/v2/models/bad_file/infer", content=infer_body(X))
        assert r.status_code == 503

    run(_with_app(repo, fn))


def test_all_versions_listed_and_metrics_dropped_on_unload(affine_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(affine_repo / "affine", repo / "affine")
    yaml_path = repo / "affine" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "version_policy: all\n")

    async def fn(c, app):
        assert (await c.get("/v2/models/affine")).json()["versions"] == ["1", "2"]
        assert (await c.get("/v2/models/affine/versions/1")).json()["versions"] == ["1"]
        for bad in ("%202", "%D9%A2", "+2", "02x"):
            assert (await c.get(f"/v2/models/affine/versions/{bad}")).status_code == 404, bad
        await c.post("/v2/models/affine/versions/1/infer", content=b"{")
        assert 'reason="invalid_input"' in (await c.get("/metrics")).text
        assert (await c.post("/v2/repository/models/affine/unload")).status_code == 200
        assert 'model="affine"' not in (await c.get("/metrics")).text

    run(_with_app(repo, fn))
