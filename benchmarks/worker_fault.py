"""Worker fault under load (issue: split models, executors): a model served with ``executor: process``
(2 instances, each a worker process), closed-loop load from 8 client threads, then ``kill -9`` of one
worker. Reported: the requests answered with an error (503) and any unanswered (must be 0), the time
until the replacement worker serves again, and throughput before and after.

    python benchmarks/worker_fault.py [--out benchmarks/results/worker_fault.json]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from rtserve.bench.report import write_json  # noqa: E402
from serving import Server  # noqa: E402
from servers import worker_pids  # noqa: E402


def main() -> int:
    from models import AFFINE_YAML, write_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results" / "worker_fault.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        write_model(repo, "affine", "onnx", AFFINE_YAML.format(backend="onnx") + "executor: process\ninstances: 2\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = Server([sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port),
                      "--log-level", "warning"], port)
        url = f"http://127.0.0.1:{port}/v2/models/affine/infer"
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
        log: list[tuple[float, float, int]] = []  # (sent, answered, status)
        stop = threading.Event()

        def client():
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        st = c.post(url, json=body).status_code
                    except httpx.HTTPError:
                        st = -1  # no answer
                    log.append((t0, time.monotonic(), st))

        try:
            victims = worker_pids(srv.proc.pid)
            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(3)
            t_kill = time.monotonic()
            os.kill(victims[0], signal.SIGKILL)
            replaced = None
            while time.monotonic() - t_kill < 30:
                now = worker_pids(srv.proc.pid)
                if len(now) == 2 and victims[0] not in now:
                    replaced = time.monotonic() - t_kill
                    break
                time.sleep(0.01)
            time.sleep(3)
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            srv.stop()
    errors = [r for r in log if r[2] != 200]
    before = [r for r in log if r[1] < t_kill and r[0] > t_kill - 2.5]
    after = [r for r in log if r[0] > t_kill + (replaced or 0) + 0.5 and r[1] < t_kill + (replaced or 0) + 3]
    last_error = max((r[1] for r in errors), default=t_kill) - t_kill
    res = {"requests": len(log), "errors_503": sum(r[2] == 503 for r in errors), "other_errors": sum(r[2] not in (200, 503) for r in errors),
           "unanswered": sum(r[2] == -1 for r in log), "worker_replaced_after_s": replaced,
           "last_error_after_kill_s": last_error,
           "throughput_before": len(before) / 2.5, "throughput_after": len(after) / max(1e-9, 2.5 - 0.5)}
    for k, v in res.items():
        print(f"{k:28s} {v}")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
