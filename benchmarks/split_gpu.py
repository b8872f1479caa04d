"""Split by structure on a CUDA GPU (issue: split models): a model too large for one process's memory
budget, served as 2 stages in 2 worker processes, each held to that budget.

An MLP of ``--depth`` x Linear(``--width``) (fp32; default 24 x 8192: 6 GiB of weights) is exported to
``.pt2``. The budget is 70% of the weights (``memory_fraction`` of the device, per process):

1. the whole model in one worker process under the budget: its load fails (the error is recorded);
2. ``rtserve split --stages 2 --balance params --devices cuda:0 --executor process``, each stage's
   worker under the same budget: loads, and its outputs are compared with the whole model's (run
   without a budget, in this process, after the split has been measured);
3. throughput at batch 64 of the split pipeline and, for reference, of the whole model unbudgeted.

    python benchmarks/split_gpu.py [--width 8192] [--depth 24] [--out benchmarks/results/split_gpu.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.split.serve import PipelineBackend  # noqa: E402
from rtserve.bench.report import write_json  # noqa: E402
from rtserve.cli import main as rtserve  # noqa: E402
from rtserve.errors import ConfigError  # noqa: E402
from rtserve.executors.process import ProcessInstance  # noqa: E402
from rtserve.export.torch_export import export_pt2  # noqa: E402


def throughput(run, x: np.ndarray, seconds: float = 3.0) -> float:
    for _ in range(3):
        run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(x)
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--out", default=str(HERE / "results" / "split_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("split_gpu: needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    layers = []
    for _ in range(args.depth):
        lin = torch.nn.Linear(args.width, args.width)
        torch.nn.init.normal_(lin.weight, std=args.width ** -0.5 * 1.4)
        layers += [lin, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    weights = sum(p.numel() * 4 for p in model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory
    budget = 0.7 * weights / total
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
           "model": f"MLP {args.depth} x Linear({args.width})", "weights_gib": weights / 2**30,
           "budget_gib": budget * total / 2**30, "memory_fraction": budget}
    x = np.random.default_rng(0).standard_normal((64, args.width), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export_pt2(model, torch.zeros(2, args.width), root / "whole.pt2", ["x"], ["y"])
        try:
            ProcessInstance("torch", root / "whole.pt2", "cuda:0", {"memory_fraction": budget}, 1, None).close()
            res["whole_under_budget"] = "loaded (the budget did not bind)"
        except ConfigError as e:
            res["whole_under_budget"] = f"refused: {e}"
        out = root / "split"
        assert rtserve(["split", str(root / "whole.pt2"), "--stages", "2", "--balance", "params", "--format", "pt2",
                        "--executor", "process", "--devices", "cuda:0", "--micro-batch", "64",
                        "--stage-options", json.dumps({"memory_fraction": budget}), "--out", str(out)]) == 0
        pipe = PipelineBackend(out / "1" / "pipeline.json", "cuda:0", {}, 1)
        try:
            got = pipe.run({"x": x})["y"]
            res["split_samples_per_s"] = throughput(lambda a: pipe.run({"x": a}), x)
        finally:
            pipe.close()
    gpu = model.to("cuda:0")
    with torch.inference_mode():
        want = gpu(torch.from_numpy(x).cuda()).cpu().numpy()
        res["whole_unbudgeted_samples_per_s"] = throughput(
            lambda a: gpu(torch.from_numpy(a).cuda()).cpu(), x)
    res["max_abs_diff"] = float(np.abs(got - want).max())
    res["max_abs_output"] = float(np.abs(want).max())
    for k, v in res.items():
        print(f"{k:32s} {v}")
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
