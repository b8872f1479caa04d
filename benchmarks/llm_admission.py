"""LLM admission control under overload: the real server, its OpenAI API, at 3x its capacity.

The ~34M Llama of benchmarks/llm_cpu.py (its builder; float32, random weights) is served by
``rtserve serve`` twice in one repository, the same weights behind two engine configs:
``llama34m_open`` (no practical queue limit) and ``llama34m`` (``max_waiting: --max-waiting``).
The OpenAI bench (rtserve.bench.openai_load) drives ``/v1/completions`` with 32-token random prompts
and outputs uniform in [16, 256] tokens, EOS ignored, streamed; three phases:

1. capacity: a closed loop at ``max_num_seqs`` concurrent requests on the open model (the batch
   always full, nothing queued): its completions per second until the last request starts are the
   capacity, its TTFT the floor;
2. at capacity: Poisson arrivals at that rate for ``--duration`` s on the admission-controlled model:
   the reference TTFT p99;
3. overload: Poisson arrivals at ``--overload`` x capacity (default 3) for ``--duration`` s.

Reported: the server stays up (ready, and answers a request afterwards), requests unanswered (no HTTP
answer at all: the target is 0), the admitted requests' TTFT p99 against the at-capacity value
(target: within 2x), and how fast refusals (429) are answered (target: p99 < 10 ms, timed by the
client from the scheduled arrival, so client lateness counts).

    python benchmarks/llm_admission.py [--duration 60] [--max-waiting 4] [--out benchmarks/results/llm_admission.json]

Client and server share the machine: on 2 cores the client's share is part of what is measured.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from llm_cpu import build  # noqa: E402  (the 34M Llama)
from llm_serving import start_server  # noqa: E402
from rtserve.bench.openai_load import OpenAIBenchConfig, run_openai_load_sync  # noqa: E402
from rtserve.bench.openai_report import format_summary  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402

ENGINE = {"num_blocks": 1024, "block_size": 16, "max_num_seqs": 16, "max_num_batched_tokens": 2048,
          "max_model_len": 512}
OPEN, LIMITED = "llama34m_open", "llama34m"


def build_repository(root: Path, max_waiting: int) -> tuple[int, dict]:
    """Two models over one checkpoint; returns the parameter count and the limited model's engine."""
    model, n_params = build(root / LIMITED / "1")
    del model
    (root / OPEN).mkdir()
    (root / OPEN / "1").symlink_to(root / LIMITED / "1", target_is_directory=True)
    engines = {OPEN: {**ENGINE, "max_waiting": 1_000_000}, LIMITED: {**ENGINE, "max_waiting": max_waiting}}
    for name, engine in engines.items():
        keys = "".join(f"  {k}: {v}\n" for k, v in engine.items())
        (root / name / "model.yaml").write_text(f"backend: llm\ndevice: cpu\nengine:\n{keys}")
    return n_params, engines[LIMITED]


def steady_throughput(records) -> float:
    """Completions per second while the closed loop kept every slot busy: from the first request's
    start to the last one's (the drain after it, with slots emptying, would understate capacity)."""
    t0, t_last = min(r.t_start for r in records), max(r.t_start for r in records)
    done = sum(1 for r in records if r.ok and r.t_end <= t_last)
    return done / (t_last - t0) if t_last > t0 else 0.0


def phase(port: int, name: str, args, **load) -> dict:
    cfg = OpenAIBenchConfig(input_len=(args.input_len,) * 2, output_len=tuple(args.output_len), vocab_size=32000,
                            seed=args.seed, **load)
    result = run_openai_load_sync("127.0.0.1", port, cfg)
    s = result.summary()
    print(f"\n== {name}: {cfg.model}, " + (f"{cfg.rate:.2f} req/s Poisson for {cfg.duration_s:g} s" if cfg.rate
                                           else f"closed loop at {cfg.concurrency}"), flush=True)
    print(format_summary(s), flush=True)
    sent = len(result.records)
    refused = s["refused"]["count"]
    return {"phase": name, "model": cfg.model, "rate": cfg.rate or 0.0, "sent": sent, "completed": s["completed"],
            "refused": refused, "unanswered": s["status_counts"].get("0", 0),
            "other_failed": s["failed"] - refused - s["status_counts"].get("0", 0),
            "req_s": s["request_throughput"], "ttft_p50": s["ttft_ms"]["p50"], "ttft_p99": s["ttft_ms"]["p99"],
            "refusal_p50": s["refused"]["latency_ms"]["p50"], "refusal_p99": s["refused"]["latency_ms"]["p99"],
            "late_arrivals": result.late_arrivals, "steady_req_s": steady_throughput(result.records), "summary": s}


def still_serving(url: str) -> bool:
    """Ready, and a request completes."""
    ready = httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
    r = httpx.post(url + "/v1/completions", timeout=60, json={"model": LIMITED, "prompt": [11, 12, 13],
                                                              "max_tokens": 4, "ignore_eos": True})
    return ready and r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def refused_on_server(url: str) -> float:
    name = f'rtserve_llm_request_refused_total{{model="{LIMITED}"}} '
    line = next((ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(name)), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def report(args, n_params: int, engine: dict, phases: list[dict], up: bool, server_refused: float) -> None:
    """Print the table and the verdict against the targets; write the JSON."""
    cap, at, over = phases
    v = {
        "capacity_req_s": cap["steady_req_s"],
        "server_up_after": up,
        "unanswered": sum(p["unanswered"] for p in phases),
        "ttft_p99_ratio_vs_at_capacity": over["ttft_p99"] / at["ttft_p99"],
        "ttft_p99_ratio_vs_closed_loop": over["ttft_p99"] / cap["ttft_p99"],
        "refusal_p99_ms": over["refusal_p99"],
        "refused_client": at["refused"] + over["refused"], "refused_server": server_refused,
        "targets": {"unanswered": "0", "ttft_p99_ratio_vs_at_capacity": "<= 2", "refusal_p99_ms": "< 10"},
    }
    cols = ["phase", "model", "rate", "sent", "completed", "refused", "unanswered", "other_failed", "req_s",
            "ttft_p50", "ttft_p99", "refusal_p50", "refusal_p99"]
    print(f"\nLlama {n_params / 1e6:.1f}M float32 on {os.cpu_count()} CPUs, engine {engine}, {args.input_len}-token "
          f"prompts, output {args.output_len[0]}-{args.output_len[1]} tokens (times in ms)")
    print(format_table(phases, cols))
    print(f"\ncapacity {v['capacity_req_s']:.2f} req/s (closed loop at {ENGINE['max_num_seqs']}, slots full); "
          f"server up afterwards: {v['server_up_after']}; unanswered: {v['unanswered']} (target 0)")
    print(f"admitted TTFT p99 at {args.overload:g}x: {over['ttft_p99']:.0f} ms = "
          f"{v['ttft_p99_ratio_vs_at_capacity']:.2f}x the at-capacity {at['ttft_p99']:.0f} ms (target <= 2x); "
          f"{v['ttft_p99_ratio_vs_closed_loop']:.1f}x the closed loop's {cap['ttft_p99']:.0f} ms")
    print(f"refusals answered in p99 {v['refusal_p99_ms']:.1f} ms (target < 10 ms); refused: {v['refused_client']} "
          f"seen by the client, {v['refused_server']:.0f} counted by the server")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                          "params": n_params, "engine": engine, "input_len": args.input_len,
                          "output_len": args.output_len, "duration_s": args.duration, "overload": args.overload,
                          "verdict": v, "phases": phases})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of each Poisson phase")
    ap.add_argument("--overload", type=float, default=3.0, help="overload rate as a multiple of the capacity")
    ap.add_argument("--max-waiting", type=int, default=4,
                    help="engine.max_waiting of the admission-controlled model (Little's law: about the capacity "
                         "in req/s times the queueing time allowed)")
    ap.add_argument("--capacity-requests", type=int, default=96, help="requests of the closed-loop phase")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "llm_admission.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_params, engine = build_repository(Path(tmp), args.max_waiting)
        proc, url = start_server(Path(tmp))
        try:
            port = int(url.rsplit(":", 1)[1])
            cap = phase(port, "capacity", args, model=OPEN, concurrency=ENGINE["max_num_seqs"],
                        num_requests=args.capacity_requests, warmup_requests=4)
            at = phase(port, "at capacity", args, model=LIMITED, rate=cap["steady_req_s"], duration_s=args.duration,
                       warmup_requests=2)
            over = phase(port, f"{args.overload:g}x capacity", args, model=LIMITED,
                         rate=args.overload * cap["steady_req_s"], duration_s=args.duration)
            up = proc.poll() is None and still_serving(url)
            server_refused = refused_on_server(url)
        finally:
            proc.terminate()
            proc.wait(30)
    report(args, n_params, engine, [cap, at, over], up, server_refused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
