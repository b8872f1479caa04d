"""Stage hand-off cost between two processes (issue: split models, process executor): a tensor of
4 KB, 1 MB or 16 MB sent to a worker process and back through ``executors/process.py`` (shared
memory + a pipe message each way), running an ONNX Identity model, against the same model run in
process. Hand-off = (round trip - in-process run) / 2, per micro-batch.

    python benchmarks/handoff.py [--repeats 300] [--out benchmarks/results/handoff.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def identity_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def main() -> int:
    from rtserve.backends.onnx import OnnxBackend
    from rtserve.bench.report import format_table, write_json
    from rtserve.executors.process import ProcessInstance

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", default=str(HERE / "results" / "handoff.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = identity_onnx(Path(tmp) / "id.onnx")
        local = OnnxBackend(path, "cpu", {"intra_op_threads": 1}, 1)
        worker = ProcessInstance("onnx", path, "cpu", {"intra_op_threads": 1}, 1, None)
        try:
            for label, nbytes in (("4 KB", 4 << 10), ("1 MB", 1 << 20), ("16 MB", 16 << 20)):
                x = np.random.default_rng(0).random((1, nbytes // 4), dtype=np.float32)
                times = {"local": [], "process": []}
                for _ in range(5):
                    local.run({"x": x}), worker.run({"x": x})
                n = args.repeats if nbytes <= 1 << 20 else max(20, args.repeats // 10)
                for _ in range(n):  # interleaved
                    for name, fn in (("local", local.run), ("process", worker.run)):
                        t0 = time.perf_counter()
                        fn({"x": x})
                        times[name].append(time.perf_counter() - t0)
                lo, pr = (1e3 * float(np.median(times[k])) for k in ("local", "process"))
                rows.append({"tensor": label, "in_process_ms": lo, "round_trip_ms": pr,
                             "handoff_ms": (pr - lo) / 2, "round_trip_p99_ms": 1e3 * float(np.percentile(times["process"], 99))})
        finally:
            worker.close()
    print(format_table(rows, list(rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
