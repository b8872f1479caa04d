"""Split by structure under load (issue: split models), served two ways on this 2-core machine, side
by side. ``--model mlp``: 8 Linear(1024, 1024) + ReLU layers (32 MB of weights, cut between layers);
``--model bert``: a 4-layer BERT encoder (hidden 256, sequences of 128 tokens) exported by ``rtserve
convert`` and cut through its ``torch.export`` graph (hidden states and mask cross the cut).

- ``whole``: one ONNX model in the server process, ONNX Runtime with 2 intra-op threads;
- ``split``: ``rtserve split --stages 2`` -> two ONNX stages in two worker processes, 1 thread each,
  micro-batches (``--micro-batch``, default 32) flowing through them, and ``--in-flight``
  batches in the pipeline at once (default 2: one per stage), so stage 1 starts the next batch while stage 2 finishes this one.

Closed-loop load (the rtserve load generator, binary-free JSON bodies of 1 x 1024 floats) at a few
concurrencies; throughput and p99, turns interleaved. Both servers batch up to 64.

    python benchmarks/split_pipeline.py [--model mlp|bert] [--duration 6] [--out ...json]
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
from rtserve.spec.model import SpecModel, save_spec_model  # noqa: E402
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


BERT_LAYERS, SEQ = 4, 128


def bert_program(root: Path) -> Path:
    """A random BERT encoder (Hugging Face files) exported to .pt2 by ``rtserve convert``."""
    import transformers

    from rtserve.export.convert import convert

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=BERT_LAYERS,
                                  num_attention_heads=4, intermediate_size=1024, max_position_embeddings=SEQ)
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(root / "bert")
    convert(root / "bert", "pt2", root / "bert.pt2")
    return root / "bert.pt2"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--micro-batch", type=int, default=32, help="the split pipeline's micro-batch")
    ap.add_argument("--model", default="mlp", choices=("mlp", "bert"))
    ap.add_argument("--in-flight", type=int, default=2, help="batches in the split pipeline at once")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/split_pipeline[_bert].json")
    args = ap.parse_args()
    out = args.out or str(HERE / "results" / ("split_pipeline.json" if args.model == "mlp" else
                                              "split_pipeline_bert.json"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole = root / "whole" / "m"
        (whole / "1").mkdir(parents=True)
        (whole / "model.yaml").write_text("backend: onnx\nmax_batch_size: 64\nbackend_options: {intra_op_threads: 2}\n"
                                          "batching: {max_queue_delay_ms: 2}\n")
        if args.model == "mlp":
            model = mlp()
            save_spec_model(SpecModel(model, (WIDTH,), "x", "y"), root / "spec")
            export_onnx(model, torch.zeros(2, WIDTH), whole / "1" / "model.onnx", ["x"], ["y"])
            src, description = root / "spec", f"MLP {DEPTH} x Linear({WIDTH}, {WIDTH})"
            x = np.random.default_rng(0).random((1, WIDTH), dtype=np.float32)
            feeds = [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": x.reshape(-1).tolist()}]
        else:
            src, description = bert_program(root), f"BERT encoder, {BERT_LAYERS} layers, hidden 256, {SEQ} tokens"
            from rtserve.export.convert import convert

            convert(root / "bert", "onnx", whole / "1" / "model.onnx")
            ids = np.random.default_rng(0).integers(1, 1000, (1, SEQ))
            feeds = [{"name": "input_ids", "shape": [1, SEQ], "datatype": "INT64", "data": ids.ravel().tolist()},
                     {"name": "attention_mask", "shape": [1, SEQ], "datatype": "INT64", "data": [1] * SEQ}]
        assert rtserve(["split", str(src), "--stages", "2", "--balance", "flops", "--executor", "process",
                        "--micro-batch", str(args.micro_batch), "--in-flight", str(args.in_flight), "--out", str(root / "split" / "m")]) == 0
        body = orjson.dumps({"inputs": feeds})
        spec = RequestSpec("POST", "/v2/models/m/infer", body, {"Content-Type": "application/json"})
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
    write_json(out, {"date": time.strftime("%Y-%m-%d"), "model": description,
                          "micro_batch": args.micro_batch, "in_flight": args.in_flight,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
