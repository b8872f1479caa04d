"""Split by structure under load (issue: split models): an MLP of 8 Linear(1024, 1024) + ReLU layers
(32 MB of weights) served two ways on this 2-core machine, side by side:

- ``whole``: one ONNX model in the server process, ONNX Runtime with 2 intra-op threads;
- ``split``: ``rtserve split --stages 2`` -> two stages in two worker processes, 1 thread each,
  micro-batches of 8 flowing through them.

Closed-loop load (the rtserve load generator, binary-free JSON bodies of 1 x 1024 floats) at a few
concurrencies; throughput and p99, turns interleaved. Both servers batch up to 64.

    python benchmarks/split_pipeline.py [--duration 6] [--out benchmarks/results/split_pipeline.json]
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from rtserve.bench.loadgen import RequestSpec, run_load_sync  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402
from rtserve.cli import main as rtserve  # noqa: E402
from rtserve.compress.torch_model import SpecModel, save_spec_model  # noqa: E402
from rtserve.export.torch_export import export_onnx  # noqa: E402
from serving import Server  # noqa: E402

WIDTH, DEPTH = 1024, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default=str(HERE / "results" / "split_pipeline.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = mlp()
        save_spec_model(SpecModel(model, (WIDTH,), "x", "y"), root / "spec")
        whole = root / "whole" / "mlp"
        export_onnx(model, torch.zeros(2, WIDTH), whole / "1" / "model.onnx", ["x"], ["y"])
        (whole / "model.yaml").write_text("backend: onnx\nmax_batch_size: 64\nbackend_options: {intra_op_threads: 2}\n"
                                          "batching: {max_queue_delay_ms: 2}\n")
        assert rtserve(["split", str(root / "spec"), "--stages", "2", "--balance", "flops", "--executor", "process",
                        "--micro-batch", "8", "--out", str(root / "split" / "mlp")]) == 0
        x = np.random.default_rng(0).random((1, WIDTH), dtype=np.float32)
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32",
                                         "data": x.reshape(-1).tolist()}]})
        spec = RequestSpec("POST", "/v2/models/mlp/infer", body, {"Content-Type": "application/json"})
        servers = {}
        try:
            for name in ("whole", "split"):
                port = free_port()
                servers[name] = Server([sys.executable, "-m", "rtserve", "serve", "--repo", str(root / name),
                                        "--port", str(port), "--log-level", "warning"], port)
            for c in args.concurrency:
                for name, srv in servers.items():  # turns, so both see the same machine state
                    res = run_load_sync("127.0.0.1", srv.port, spec, concurrency=c, duration_s=args.duration,
                                        warmup_s=1.0)
                    s = res.summary()
                    rows.append({"variant": name, "concurrency": c, "throughput": s["throughput"], "p50_ms": s["p50"],
                                 "p99_ms": s["p99"], "errors": s["errors"]})
                    print(format_table([rows[-1]], list(rows[-1])), flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
    print()
    print(format_table(rows, list(rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "model": f"MLP {DEPTH} x Linear({WIDTH}, {WIDTH})",
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
