"""int8 quantization of the digits CNN (issue: compression): fp32 ONNX against int8-static (QDQ,
calibrated on 256 training images) and int8-dynamic, side by side.

All three models are timed in one run, interleaved round-robin (``rtserve.compress.report.
measure_latency``), with rtserve's ONNX backend session settings and the same thread count, at
batch 1 and 64; accuracy is on the 360 held-out digits. Sizes and parameter counts are read from
the files.

    python benchmarks/compress_digits.py [--threads 1] [--repeats 300] [--out benchmarks/results/compress_digits.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from rtserve.bench.report import write_json  # noqa: E402
from rtserve.compress.cli import _outputs, _session  # noqa: E402
from rtserve.compress.onnx_quant import CalibrationData, has_vnni, quantize_onnx  # noqa: E402
from rtserve.compress.report import (CompressionReport, accuracy, compare_outputs, format_report,  # noqa: E402
                                     machine_info, measure_latency, model_stats)
from rtserve.demo import digits_data, train_digits  # noqa: E402
from rtserve.export.torch_export import export_onnx  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=256, help="training images used for calibration")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compress_digits.json")
    args = ap.parse_args()

    xtr, _, xte, yte = digits_data()
    model, torch_acc = train_digits()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, torch.zeros(2, 1, 8, 8), Path(tmp) / "fp32.onnx", ["image"], ["logits"])
        calib = CalibrationData({"image": xtr[:args.calibration]}, f"digits training images [:{args.calibration}]")
        recipes = {
            "int8-static": quantize_onnx(fp32, Path(tmp) / "static.onnx", "int8-static", calib),
            "int8-dynamic": quantize_onnx(fp32, Path(tmp) / "dynamic.onnx", "int8-dynamic"),
        }
        paths = {"fp32": fp32, "int8-static": Path(tmp) / "static.onnx", "int8-dynamic": Path(tmp) / "dynamic.onnx"}
        sessions = {name: _session(p, args.threads) for name, p in paths.items()}
        lat = measure_latency(sessions, lambda b: {"image": xte[:b].copy()},
                              batches=(1, args.max_batch), repeats=args.repeats)
        stats = {name: model_stats(p) for name, p in paths.items()}
        ref = _outputs(sessions["fp32"], {"image": xte}, args.max_batch)
        for name, s in stats.items():
            out = ref if name == "fp32" else _outputs(sessions[name], {"image": xte}, args.max_batch)
            s.fidelity = {"accuracy": accuracy(out, yte), **compare_outputs(ref, out)}
            s.latency = lat[name]
            s.path = f"{name}.onnx"
    machine = machine_info(args.threads, has_vnni())
    notes = [f"one interleaved run: {args.repeats} runs per model and batch size, {args.threads} thread(s)",
             f"accuracy on {len(yte)} held-out digits; PyTorch fp32 accuracy {100 * torch_acc:.2f}%"]
    reports = [CompressionReport(m, recipes[m], stats["fp32"], stats[m], machine, notes=notes) for m in recipes]
    print(format_report(reports))
    drop = {m: 100 * (stats["fp32"].fidelity["accuracy"] - stats[m].fidelity["accuracy"]) for m in recipes}
    print("accuracy drop vs fp32 (points): " + ", ".join(f"{m} {d:+.2f}" for m, d in drop.items()))
    write_json(args.out, {"command": "python benchmarks/compress_digits.py " + " ".join(sys.argv[1:]),
                          "reports": [dataclasses.asdict(r) for r in reports], "accuracy_drop_points": drop})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
