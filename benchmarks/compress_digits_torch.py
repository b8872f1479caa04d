"""Structured pruning and knowledge distillation of the digits CNN (issue: compress and convert),
through ``rtserve compress`` on a PyTorch spec model in a temporary repository:

- ``--prune 0.5 --structured`` + 6 fine-tuning epochs: target >= 1.3x faster, within 1 accuracy point;
- ``--distill --student`` (a student with at most a quarter of the parameters): >= 97% of the
  teacher's accuracy;
- ``--prune 0.5`` (magnitude, unstructured) for contrast: no speedup.

Latency: both models exported to ONNX and timed side by side by ONNX Runtime, 1 thread, batch 1 and
64, interleaved. Accuracy on the 360 held-out digits.

    python benchmarks/compress_digits_torch.py [--out benchmarks/results/compress_digits_torch.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.report import write_json  # noqa: E402
from rtserve.cli import main as rtserve  # noqa: E402
from rtserve.spec.model import SpecModel, save_spec_model  # noqa: E402
from rtserve.demo import digits_data, train_digits  # noqa: E402

STUDENT = {"layers": [["conv2d", 4, 3, {"padding": 1}], ["relu"], ["conv2d", 8, 3, {"padding": 1}], ["relu"],
                      ["maxpool2d", 2], ["flatten"], ["linear", 32], ["relu"], ["linear", 10]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results" / "compress_digits_torch.json"))
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    model, _ = train_digits()
    xtr, ytr, xte, yte = digits_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = root / "repo" / "digits"
        save_spec_model(SpecModel(model, (1, 8, 8), "image", "logits"), repo / "1")
        (repo / "model.yaml").write_text("backend: onnx\nmax_batch_size: 64\nversion_policy: all\n")
        np.savez(root / "train.npz", image=xtr, labels=ytr)
        np.savez(root / "test.npz", image=xte, labels=yte)
        (root / "student.json").write_text(json.dumps(STUDENT))
        common = ["--eval-data", str(root / "test.npz"), "--out", str(repo), "--repeats", str(args.repeats)]
        runs = [
            ("structured pruning 50% + fine-tuning", ["--prune", "0.5", "--structured", "--data", str(root / "train.npz"),
                                                     "--epochs", "6", "--lr", "1e-3"]),
            ("distillation, 1/8 of the parameters", ["--distill", "--student", str(root / "student.json"),
                                                     "--data", str(root / "train.npz")]),
            ("magnitude pruning 50%", ["--prune", "0.5"]),
        ]
        for version, (name, flags) in enumerate(runs, start=2):
            assert rtserve(["compress", str(repo / "1"), *flags, *common]) == 0
            r = json.loads((repo / str(version) / "report.json").read_text())
            s, q = r["source"], r["result"]
            lat = lambda st, b: next(x["p50_ms"] for x in st["latency"] if x["batch"] == b)  # noqa: E731
            rows.append({"run": name, "params": q["params"], "params_ratio": q["params"] / s["params"],
                         "speed_b1": lat(s, 1) / lat(q, 1), "speed_b64": lat(s, 64) / lat(q, 64),
                         "accuracy": q["fidelity"]["accuracy"], "teacher_accuracy": s["fidelity"]["accuracy"],
                         "accuracy_points": 100 * (q["fidelity"]["accuracy"] - s["fidelity"]["accuracy"]),
                         "accuracy_ratio": q["fidelity"]["accuracy"] / s["fidelity"]["accuracy"]})
    print("\n{:40s} {:>8s} {:>7s} {:>9s} {:>10s} {:>9s} {:>7s}".format(
        "run", "params", "ratio", "speed b1", "speed b64", "accuracy", "points"))
    for r in rows:
        print(f"{r['run']:40s} {r['params']:8d} {r['params_ratio']:7.3f} {r['speed_b1']:8.2f}x {r['speed_b64']:9.2f}x "
              f"{r['accuracy']:9.2%} {r['accuracy_points']:+7.2f}")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
