"""Tensor serving benchmark (issue: real-time tensor serving). Prints tables, writes JSON.

Side by side in one run, same load generator (rtserve.bench.loadgen, closed loop, JSON bodies):
  - rtserve with dynamic batching on, rtserve with batching off (max_batch_size 1),
  - a plain FastAPI + ONNX Runtime server (benchmarks/fastapi_floor.py) as the floor,
on two models: the digits CNN (tiny: per-request HTTP cost dominates) and a small ResNet-style CNN
on 3x32x32 images (batch 1 takes milliseconds, batch 32 far less per item).
Then: serving overhead at concurrency 1 (HTTP median minus the backend's own median run time), and
overload (Poisson arrivals at 3x the measured capacity for 30 s).

    python benchmarks/serving.py [--duration 5] [--quick] [--out benchmarks/results/serving.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.loadgen import RequestSpec, run_load_sync  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402
from rtserve.cli import build_infer_body  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)


def resnet_small():
    """A small ResNet-style CNN for 3x32x32 images with a VGG-style fully connected head (random
    weights: speed only). The head's 2048x3072 and 3072x1024 weights make batch 1 a memory-bound
    matrix-vector product: measured alone with ONNX Runtime on one thread here, batch 1 takes
    ~3.2 ms and a batch of 32 ~0.66 ms per image, the kind of model dynamic batching is for.
    (A conv-only net gains little: ONNX Runtime's convolutions are already efficient at batch 1.)"""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x + self.c2(self.act(self.c1(x))))

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), Block(32),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), Block(64),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), Block(128),
        nn.Flatten(), nn.Linear(2048, 3072), nn.ReLU(), nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def build_models(root: Path) -> dict[str, dict]:
    import torch

    from rtserve.demo import train_digits
    from rtserve.export.torch_export import export_onnx

    torch.manual_seed(0)
    digits, _ = train_digits(epochs=2)
    models = {
        "digits": {"module": digits, "example": torch.zeros(2, 1, 8, 8), "max_batch": 64},
        "resnet": {"module": resnet_small().eval(), "example": torch.zeros(2, 3, 32, 32), "max_batch": 32},
    }
    for name, m in models.items():
        m["onnx"] = export_onnx(m["module"], m["example"], root / "onnx" / f"{name}.onnx", ["input"], ["output"])
    return models


def write_repo(root: Path, models: dict, batching: bool) -> Path:
    repo = root / ("repo_batching" if batching else "repo_nobatch")
    for name, m in models.items():
        d = repo / name / "1"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(Path(m["onnx"]).read_bytes())
        mb = m["max_batch"] if batching else 1
        (repo / name / "model.yaml").write_text(
            f"backend: onnx\ndevice: cpu\nmax_batch_size: {mb}\n"
            f"batching:\n  max_queue_delay_ms: 2\n  max_queue_size: 1024\n"
            f"backend_options:\n  intra_op_threads: 1\n  inter_op_threads: 1\n")
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def rtserve_server(repo: Path) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port),
                   "--log-level", "warning"], port)


def floor_server(onnx_path: Path) -> Server:
    port = free_port()
    return Server([sys.executable, str(HERE / "fastapi_floor.py"), str(onnx_path), str(port)], port)


def request_for(model: str, meta_inputs: list[dict], binary: bool = False) -> RequestSpec:
    body, headers = build_infer_body({"inputs": meta_inputs}, batch=1, binary=binary)
    return RequestSpec("POST", f"/v2/models/{model}/infer", body, headers)


def compute_totals(port: int, model: str) -> tuple[float, float]:
    """(sum seconds, count) of the server's compute histogram for ``model``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    vals = {}
    for kind in ("sum", "count"):
        key = f'rtserve_compute_duration_seconds_{kind}{{model="{model}",version="1"}} '
        line = next((ln for ln in text.splitlines() if ln.startswith(key)), key + "0")
        vals[kind] = float(line.split()[-1])
    return vals["sum"], vals["count"]


def backend_median_ms(onnx_path: Path, shape: tuple, n: int = 2000) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    name = s.get_inputs()[0].name
    for _ in range(50):
        s.run(None, {name: x})
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--overload-duration", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    ap.add_argument("--sections", default="load,overhead,overload",
                    help="comma-separated subset of load,overhead,overload")
    ap.add_argument("--out", default=str(HERE / "results" / "serving.json"))
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup, args.overload_duration = 1.0, 0.3, 3.0

    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "date": time.strftime("%Y-%m-%d"), "duration_s": args.duration, "load": [], "overhead": [],
                     "overload": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root)
        shapes = {"digits": (1, 1, 8, 8), "resnet": (1, 3, 32, 32)}
        inputs = {name: [{"name": "input", "datatype": "FP32", "shape": list(shapes[name])}] for name in models}
        sections = set(args.sections.split(","))
        rows = []
        if "load" in sections:
            # All servers run side by side (idle ones cost nothing) and the variants take turns at
            # each concurrency level, so every ratio compares measurements minutes apart at most.
            servers = {"rtserve-batching": rtserve_server(write_repo(root, models, batching=True)),
                       "rtserve-nobatch": rtserve_server(write_repo(root, models, batching=False))}
            floors = {name: floor_server(Path(m["onnx"])) for name, m in models.items()}
            try:
                for name in models:
                    spec = request_for(name, inputs[name])
                    for c in CONCURRENCY:
                        for variant in ("rtserve-batching", "rtserve-nobatch", "fastapi-floor"):
                            srv = floors[name] if variant == "fastapi-floor" else servers[variant]
                            res = run_load_sync("127.0.0.1", srv.port, spec, concurrency=c,
                                                duration_s=args.duration, warmup_s=args.warmup)
                            row = {"model": name, "server": variant, "concurrency": c, **res.summary()}
                            rows.append(row)
                            print(format_table([row], ["model", "server", "concurrency", "throughput", "p50",
                                                       "p99", "errors", "unanswered"]), flush=True)
            finally:
                for srv in [*servers.values(), *floors.values()]:
                    srv.stop()
        results["load"] = rows

        # serving overhead at concurrency 1: (a) strict: HTTP median minus the model's median run
        # time measured alone, back to back; (b) server-side: HTTP mean minus the mean compute time
        # the server itself recorded for the same requests (rtserve_compute_duration_seconds).
        srv = rtserve_server(write_repo(root, models, batching=True)) if "overhead" in sections else None
        try:
            for name in models if srv else ():
                before = compute_totals(srv.port, name)
                res = run_load_sync("127.0.0.1", srv.port, request_for(name, inputs[name]), concurrency=1,
                                    duration_s=args.duration, warmup_s=0)
                after = compute_totals(srv.port, name)
                compute_mean = (after[0] - before[0]) / max(1, after[1] - before[1]) * 1000
                http_p50 = res.percentile(50)
                backend = backend_median_ms(Path(models[name]["onnx"]), shapes[name])
                results["overhead"].append({"model": name, "http_p50_ms": http_p50, "backend_alone_p50_ms": backend,
                                            "overhead_ms": http_p50 - backend, "http_mean_ms": res.summary()["mean"],
                                            "server_compute_mean_ms": compute_mean,
                                            "overhead_vs_server_compute_ms": res.summary()["mean"] - compute_mean})
        finally:
            if srv:
                srv.stop()

        # overload: on a server whose queue holds one batch, measure capacity and the reference p99
        # (closed loop, concurrency 32 and 64, binary tensors), then Poisson arrivals at 3x capacity.
        for name in models if "overload" in sections else ():
            mb = models[name]["max_batch"]
            repo = write_repo(root / f"overload_{name}", {name: models[name]}, batching=True)
            (repo / name / "model.yaml").write_text(
                f"backend: onnx\ndevice: cpu\nmax_batch_size: {mb}\nbatching:\n  max_queue_delay_ms: 2\n"
                f"  max_queue_size: {mb}\nbackend_options:\n  intra_op_threads: 1\n")
            srv = rtserve_server(repo)
            spec = request_for(name, inputs[name], binary=True)
            try:
                refs = {c: run_load_sync("127.0.0.1", srv.port, spec, concurrency=c, duration_s=args.duration,
                                         warmup_s=args.warmup).summary() for c in (32, 64)}
                cap = max(r["throughput"] for r in refs.values())
                res = run_load_sync("127.0.0.1", srv.port, spec, rate=3 * cap, duration_s=args.overload_duration,
                                    warmup_s=2.0)
                alive = httpx.get(f"http://127.0.0.1:{srv.port}/v2/health/live").status_code == 200
            finally:
                srv.stop()
            s = res.summary()
            rej = sorted(res.error_latencies_ms)
            results["overload"].append({
                # ok / elapsed: answers that arrive while the window drains do not inflate the rate
                "model": name, "capacity_rps": cap, "offered_rps": 3 * cap,
                "admitted_rps": res.num_ok / res.elapsed_s if res.elapsed_s else 0.0,
                "admitted_p50_ms": s["p50"], "admitted_p99_ms": s["p99"],
                "reference_p99_ms_c32": refs[32]["p99"], "reference_p99_ms_c64": refs[64]["p99"],
                "rejected": sum(v for k, v in s["status_counts"].items() if int(k) == 503),
                "rejected_p50_ms": float(np.percentile(rej, 50)) if rej else None,
                "rejected_p99_ms": float(np.percentile(rej, 99)) if rej else None,
                "status_counts": s["status_counts"], "client_errors": res.errors, "unanswered": s["unanswered"],
                "server_alive": alive,
            })

    if results["load"]:
        print("\n== throughput and latency (closed loop, JSON) ==")
        print(format_table(results["load"], ["model", "server", "concurrency", "throughput", "p50", "p99", "errors"]))
    ratios = []
    for name in models if results["load"] else ():
        at = {r["server"]: r for r in results["load"] if r["model"] == name and r["concurrency"] == 32}
        ratios.append({"model": name,
                       "batching/nobatch": at["rtserve-batching"]["throughput"] / at["rtserve-nobatch"]["throughput"],
                       "batching/fastapi": at["rtserve-batching"]["throughput"] / at["fastapi-floor"]["throughput"],
                       "p99 batching": at["rtserve-batching"]["p99"], "p99 nobatch": at["rtserve-nobatch"]["p99"]})
    results["ratios_c32"] = ratios
    if ratios:
        print("\n== ratios at concurrency 32 ==")
        print(format_table(ratios, list(ratios[0])))
    if results["overhead"]:
        print("\n== serving overhead at concurrency 1 (ms) ==")
        print(format_table(results["overhead"], list(results["overhead"][0])))
    print("\n== overload: Poisson at 3x capacity, binary tensors, queue bounded to one batch ==")
    print(format_table(results["overload"], ["model", "capacity_rps", "offered_rps", "admitted_rps",
                                             "admitted_p99_ms", "reference_p99_ms_c32", "reference_p99_ms_c64",
                                             "rejected", "rejected_p50_ms", "rejected_p99_ms", "client_errors",
                                             "unanswered", "server_alive"]))
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
