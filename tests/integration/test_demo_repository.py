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
                np.testing.assert_allclose(logits["digits_tflite"], logits["digits"], atol=1e-4)
        finally:
            await app.shutdown()

    asyncio.run(main())
    # a second call reuses what the first built
    marker = repo / ".demo-version"
    mtime = marker.stat().st_mtime
    assert ensure_demo_repository(tmp_path) == repo and marker.stat().st_mtime == mtime
