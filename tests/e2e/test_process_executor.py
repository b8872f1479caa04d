"""``executor: process``: instances run in worker processes (tensors through shared memory); a
worker killed with SIGKILL under load is restarted, its batch is answered with 503, nothing goes
unanswered, and later requests succeed."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from models import AFFINE_YAML, expected, write_model
from servers import start_server, worker_pids

pytestmark = pytest.mark.timeout(120)


def infer(url: str, x: np.ndarray, model: str = "affine") -> httpx.Response:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)


def test_worker_processes_serve_and_survive_kill_9(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo, "affine", "onnx", AFFINE_YAML.format(backend="onnx") + "executor: process\ninstances: 2\n")
    with start_server(repo, tmp_path) as srv:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        r = infer(srv.url, x)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(3, 3), expected(x))
        pids = worker_pids(srv.proc.pid)
        assert len(pids) == 2, pids

        statuses: list[int] = []
        stop = threading.Event()

        def load():
            while not stop.is_set():
                statuses.append(infer(srv.url, x).status_code)

        def wait_for(cond, timeout: float = 30.0) -> None:
            end = time.monotonic() + timeout
            while not cond() and time.monotonic() < end:
                time.sleep(0.05)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: statuses.count(200) >= 20)  # under load (counted, not timed: CI may be slow)
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(worker_pids(srv.proc.pid)) == 2 and pids[0] not in worker_pids(srv.proc.pid))
        after = len(statuses)
        wait_for(lambda: statuses[after:].count(200) >= 20)  # served again after the replacement
        stop.set()
        for t in threads:
            t.join(30)
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses[after:].count(200) >= 20
        assert statuses.count(503) <= 4  # at most the batches the dead worker held
        assert len(worker_pids(srv.proc.pid)) == 2
        assert all(infer(srv.url, x).status_code == 200 for _ in range(10))
        assert "died" in srv.log_text()
