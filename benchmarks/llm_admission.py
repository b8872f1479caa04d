"""LLM admission control under overload: the real server, its OpenAI API, at 3x its capacity.

The ~34M Llama of benchmarks/llm_cpu.py (its builder; float32, random weights) is served by
``rtserve serve`` several times in one repository, the same weights behind different engine configs:
``llama34m_open`` (no practical queue limit) and one ``llama34m_w{N}`` per ``--max-waiting`` value N.
The OpenAI bench (rtserve.bench.openai_load) drives ``/v1/completions`` with 32-token random prompts
and outputs uniform in [16, 256] tokens, EOS ignored, streamed; the phases:

1. capacity: a closed loop at ``max_num_seqs`` concurrent requests on the open model: the server at
   its capacity (every batch slot busy, nothing queued). Its completions per second until the last
   request starts are the capacity, its TTFT p99 the reference ("the value at capacity");
2. overload, once per ``--max-waiting`` value: Poisson arrivals at ``--overload`` x capacity
   (default 3) for ``--duration`` s on that model.

Reported: the server stays up (ready, and answers a request afterwards), requests unanswered (no HTTP
answer at all: the target is 0), the admitted requests' TTFT p99 against the value at capacity
(target: within 2x, for ``max_waiting: 0``, the setting meant to bound TTFT: a request is admitted
only into a free slot), and how fast refusals (429) are answered (target: p99 < 10 ms, timed by the
client from the scheduled arrival, so client lateness counts). A larger ``max_waiting`` trades
refusals for queueing: its TTFT grows by about max_waiting / capacity seconds.

    python benchmarks/llm_admission.py [--duration 60] [--max-waiting 0 4] [--out benchmarks/results/llm_admission.json]

Client and server share the machine: on 2 cores the client's share is part of what is measured.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
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
OPEN = "llama34m_open"


def limited(max_waiting: int) -> str:
    return f"llama34m_w{max_waiting}"


def build_repository(root: Path, max_waitings: list[int]) -> int:
    """One model per engine config over one checkpoint (copied: the server refuses symlinks that
    leave a model's folder); returns the parameter count."""
    model, n_params = build(root / OPEN / "1")
    del model
    engines = {OPEN: {**ENGINE, "max_waiting": 1_000_000}} | {limited(w): {**ENGINE, "max_waiting": w}
                                                                 for w in max_waitings}
    for name, engine in engines.items():
        if name != OPEN:
            shutil.copytree(root / OPEN / "1", root / name / "1", copy_function=os.link)
        keys = "".join(f"  {k}: {v}\n" for k, v in engine.items())
        (root / name / "model.yaml").write_text(f"backend: llm\ndevice: cpu\nengine:\n{keys}")
    return n_params


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


def still_serving(url: str, model: str) -> bool:
    """Ready, and a request completes."""
    ready = httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
    r = httpx.post(url + "/v1/completions", timeout=60, json={"model": model, "prompt": [11, 12, 13],
                                                              "max_tokens": 4, "ignore_eos": True})
    return ready and r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def refused_on_server(url: str, model: str) -> float:
    name = f'rtserve_llm_request_refused_total{{model="{model}"}} '
    line = next((ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(name)), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def report(args, n_params: int, phases: list[dict], checks: dict) -> None:
    """Print the table and the verdict against the targets; write the JSON."""
    cap, overs = phases[0], phases[1:]
    verdicts = []
    for w, over in zip(args.max_waiting, overs):
        verdicts.append({
            "max_waiting": w, "server_up_after": checks[w]["up"], "unanswered": over["unanswered"],
            "ttft_p99_ms": over["ttft_p99"], "ttft_p99_ratio_vs_capacity": over["ttft_p99"] / cap["ttft_p99"],
            "refusal_p99_ms": over["refusal_p99"], "refused_client": over["refused"],
            "refused_server": checks[w]["refused"]})
    cols = ["phase", "model", "rate", "sent", "completed", "refused", "unanswered", "other_failed", "req_s",
            "ttft_p50", "ttft_p99", "refusal_p50", "refusal_p99"]
    print(f"\nLlama {n_params / 1e6:.1f}M float32 on {os.cpu_count()} CPUs, engine {ENGINE}, {args.input_len}-token "
          f"prompts, output {args.output_len[0]}-{args.output_len[1]} tokens (times in ms)")
    print(format_table(phases, cols))
    print(f"\ncapacity {cap['steady_req_s']:.2f} req/s, TTFT p99 {cap['ttft_p99']:.0f} ms (closed loop at "
          f"{ENGINE['max_num_seqs']}: every slot busy, nothing queued); unanswered: "
          f"{sum(p['unanswered'] for p in phases)} (target 0)")
    for v in verdicts:
        target = " (target <= 2x)" if v["max_waiting"] == 0 else ""
        print(f"max_waiting {v['max_waiting']}: admitted TTFT p99 at {args.overload:g}x {v['ttft_p99_ms']:.0f} ms = "
              f"{v['ttft_p99_ratio_vs_capacity']:.2f}x the value at capacity{target}; refusals answered in p99 "
              f"{v['refusal_p99_ms']:.1f} ms (target < 10 ms); refused {v['refused_client']} seen by the client, "
              f"{v['refused_server']:.0f} counted by the server; server up afterwards: {v['server_up_after']}")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                          "params": n_params, "engine": ENGINE, "input_len": args.input_len,
                          "output_len": args.output_len, "duration_s": args.duration, "overload": args.overload,
                          "targets": {"unanswered": "0", "ttft_p99_ratio_vs_capacity (max_waiting 0)": "<= 2",
                                      "refusal_p99_ms": "< 10"},
                          "verdicts": verdicts, "phases": phases})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of each Poisson phase")
    ap.add_argument("--overload", type=float, default=3.0, help="overload rate as a multiple of the capacity")
    ap.add_argument("--max-waiting", type=int, nargs="+", default=[0, 4],
                    help="engine.max_waiting of each admission-controlled model, one overload phase each "
                         "(0: admit only into a free slot)")
    ap.add_argument("--capacity-requests", type=int, default=96, help="requests of the closed-loop phase")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "llm_admission.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_repository(Path(tmp), args.max_waiting)
        proc, url = start_server(Path(tmp))
        phases, checks = [], {}
        try:
            port = int(url.rsplit(":", 1)[1])
            cap = phase(port, "capacity", args, model=OPEN, concurrency=ENGINE["max_num_seqs"],
                        num_requests=args.capacity_requests, warmup_requests=4)
            phases.append(cap)
            for w in args.max_waiting:
                phases.append(phase(port, f"{args.overload:g}x capacity", args, model=limited(w),
                                    rate=args.overload * cap["steady_req_s"], duration_s=args.duration,
                                    warmup_requests=2))
                checks[w] = {"up": proc.poll() is None and still_serving(url, limited(w)),
                             "refused": refused_on_server(url, limited(w))}
        finally:
            proc.terminate()
            proc.wait(30)
    report(args, n_params, phases, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
