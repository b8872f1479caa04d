"""``executor: ray`` against a local Ray instance started by the test: instances are actors in a
placement group, outputs are right, a killed actor is restarted (its batch a 503, later ones fine),
and a placement Ray cannot satisfy is a load error naming the resources."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest

from models import AFFINE_YAML, expected, write_model
from rtserve.config import ServerConfig
from rtserve.server.app import App

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def body(x):
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]})


def test_ray_actors_serve_restart_and_report_placement(local_ray, tmp_path):
    write_model(tmp_path, "affine", "onnx", AFFINE_YAML.format(backend="onnx")
                + "executor: ray\ninstances: 2\nexecutor_options: {num_cpus: 0.5, placement: SPREAD}\n")
    write_model(tmp_path, "greedy", "onnx", AFFINE_YAML.format(backend="onnx")
                + "executor: ray\nexecutor_options: {num_cpus: 64, placement_timeout_s: 2}\n")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    async def main():
        app = App(ServerConfig(repository=str(tmp_path)))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post("/v2/models/affine/infer", content=body(x))
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 3), expected(x))
                model = app.repository.get("affine")
                pids = {ray.get(i.actor.pid.remote()) for i in model.instances}
                assert len(pids) == 2  # two actors, two processes
                ray.kill(model.instances[0].actor, no_restart=False)
                statuses = [(await c.post("/v2/models/affine/infer", content=body(x))).status_code for _ in range(6)]
                assert set(statuses) <= {200, 503} and statuses[-1] == 200
                index = (await c.post("/v2/repository/index")).json()
                reason = next(m["reason"] for m in index if m["name"] == "greedy")
                assert "could not place" in reason and "CPU" in reason
        finally:
            await app.shutdown()

    asyncio.run(main())


def test_pipeline_stages_as_ray_actors(local_ray, tmp_path, capsys):
    """``rtserve split --executor ray``: each stage an actor; served outputs equal the whole model's."""
    import torch

    from rtserve.cli import main as cli
    from rtserve.spec.model import SpecModel, save_spec_model
    from rtserve.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn().eval()
    save_spec_model(SpecModel(model, (1, 8, 8), "image", "logits"), tmp_path / "spec")
    # split verifies with the stages in place: with ray they are actors of the running local instance
    assert cli(["split", str(tmp_path / "spec"), "--stages", "2", "--executor", "ray",
                "--out", str(tmp_path / "repo" / "d")]) == 0
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()

    async def main():
        app = App(ServerConfig(repository=str(tmp_path / "repo")))
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post("/v2/models/d/infer", content=orjson.dumps({"inputs": [{
                    "name": "image", "shape": [5, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}))
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(5, 10), want, atol=1e-5)
        finally:
            await app.shutdown()

    asyncio.run(main())
