"""LLM serving benchmark (issue 13: the server at the engine's speed): the real server, its OpenAI
API, streamed, beside the offline engine on the same machine in one run.

Builds the ~34M Llama of benchmarks/llm_cpu.py (hidden 512, 6 layers, 8 heads, 4 KV heads,
intermediate 1408, vocab 32000, tied embeddings, float32, random weights) in a temp model repository,
starts ``rtserve serve`` on a free loopback port, and in turns (``--rounds`` times, interleaved):

- offline: ``LLM.generate`` in this process on the same checkpoint and engine settings, batches of
  ``c`` 32-token prompts, 128 tokens each (EOS ignored), ``--waves`` batches per ``c``;
- served: ``/v1/completions`` streamed by the OpenAI bench (rtserve.bench.openai_load), closed loop
  with ``c`` clients, ``c * --waves`` requests of the same shape (so the same batches form).

Without options the served model has the default ``engine_core`` (auto: the engine in a process of
its own). With ``--engine-process``, the served model says ``engine_core: thread`` and a second
server whose model says ``engine_core: process`` (``rtserve.llm.engine_core``) joins the
closed-loop rounds (``process_`` columns): the thread and the process measured side by side.

Then open-loop Poisson runs at ``--load-fractions`` of the served capacity just measured (the best
closed-loop request rate), for TTFT p99 under load, and any ``--rate`` given. The load generator
shares the machine's cores with the server: its CPU time (this process, ``time.process_time``) and
the server's (psutil) are reported for every served run. With ``--profile DIR`` and py-spy on the
PATH, each closed-loop run is sampled (``py-spy record --gil``: only the thread holding the GIL).

    python benchmarks/llm_serving.py [--closed 16 64] [--rounds 2] [--load-fractions 0.5 0.9] [--engine-process]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.openai_load import OpenAIBenchConfig, run_openai_load_sync  # noqa: E402
from rtserve.bench.openai_report import format_summary, plot  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402

ENGINE = {"num_blocks": 2048, "block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 2048,
          "max_model_len": 512}


def build_repository(root: Path, engine_process: bool = False) -> int:
    """model_repository/llama34m/{model.yaml, 1/}; returns the parameter count."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                   tie_word_embeddings=True, torch_dtype="float32")
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "llama34m" / "1", safe_serialization=True)
    engine = "".join(f"  {k}: {v}\n" for k, v in ENGINE.items())
    core = "  engine_core: thread\n" if engine_process else ""  # else the default (auto: a process)
    (root / "llama34m" / "model.yaml").write_text(f"backend: llm\ndevice: cpu\nengine:\n{engine}{core}")
    # the same checkpoint with the engine in a process of its own (--engine-process)
    shutil.copytree(root / "llama34m" / "1", root / "process" / "llama34m" / "1")
    (root / "process" / "llama34m" / "model.yaml").write_text(
        f"backend: llm\ndevice: cpu\nengine:\n{engine}  engine_core: process\n")
    return sum(p.numel() for p in model.parameters())


def start_server(repo: Path, src: str | None = None) -> tuple[subprocess.Popen, str]:
    """``rtserve serve`` on a free port, from ``src`` (another checkout's src/, for a comparison)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": src or str(HERE.parent / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 180
    while True:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            raise SystemExit("the server did not become ready")
        time.sleep(0.3)


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server process and its children (an engine process)."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Offline:
    """The engine without the server: this process, the served checkpoint and engine settings."""

    def __init__(self, model_dir: Path, threads: int, main_thread: bool = False) -> None:
        import torch

        from rtserve.llm.engine import LLM
        from rtserve.llm.engine_config import EngineConfig

        torch.set_num_threads(threads)
        self.main_thread = main_thread
        self.llm = LLM(model_dir, EngineConfig.from_dict(ENGINE))
        self.run(1, 1, 8, 4, 0)  # warm up

    @staticmethod
    def _params(n: int):
        from rtserve.llm.sampling_params import SamplingParams

        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def run(self, concurrency: int, waves: int, input_len: int, output_len: int, seed: int) -> dict:
        """On a worker thread by default, as the server's engine runs: on a busy machine a main thread's
        OpenMP team measured 5-10x slower here (waiting for its preempted workers) than the same
        generate on another thread; ``--offline-main-thread`` runs it as llm_cpu.py does."""
        if self.main_thread:
            return self._run(concurrency, waves, input_len, output_len, seed)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(self._run, concurrency, waves, input_len, output_len, seed).result()

    def _run(self, concurrency: int, waves: int, input_len: int, output_len: int, seed: int) -> dict:
        import random

        rng = random.Random(seed)
        tokens, t0 = 0, time.perf_counter()
        for _ in range(waves):
            prompts = [[rng.randrange(32000) for _ in range(input_len)] for _ in range(concurrency)]
            out = self.llm.generate(prompts, self._params(output_len))
            tokens += sum(len(o.outputs[0].token_ids) for o in out)
        dt = time.perf_counter() - t0
        return {"output_token_throughput": tokens / dt, "duration_s": dt}


def served(port: int, cfg: OpenAIBenchConfig, server_pid: int, profile: Path | None, label: str) -> dict:
    """One load run; the summary with the load generator's and the server's CPU seconds."""
    spy = None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([shutil.which("py-spy"), "record", "--pid", str(server_pid), "--gil", "--threads",
                                "--format", "raw", "--rate", "200", "--nonblocking", "-o", str(profile / f"{label}.txt")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    srv0, cpu0 = server_cpu_s(server_pid), time.process_time()
    result = run_openai_load_sync("127.0.0.1", port, cfg)
    client_cpu, server_cpu = time.process_time() - cpu0, server_cpu_s(server_pid) - srv0
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
        spy.wait(60)
    s = result.summary()
    return {**s, "client_cpu_s": client_cpu, "server_cpu_s": server_cpu,
            "client_cpu_share": client_cpu / s["duration_s"], "server_cpu_share": server_cpu / s["duration_s"],
            "_result": result}


def closed_loop(args, servers: dict[str, tuple[int, int]], offline: Offline, slos: dict) -> list[dict]:
    """Offline, then each server (name -> (port, pid)), at each client count, ``--rounds`` times
    interleaved; a row per round and count."""
    rows = []
    for r in range(args.rounds):
        for c in args.closed:
            seed = args.seed + 100 * r + c
            off = offline.run(c, args.waves, args.input_len, args.output_len[1], seed)
            row = {"round": r, "clients": c, "offline_tok_s": off["output_token_throughput"], "offline": off}
            for name, (port, pid) in servers.items():
                cfg = OpenAIBenchConfig("llama34m", concurrency=c, num_requests=c * args.waves,
                                        input_len=(args.input_len,) * 2, output_len=(args.output_len[1],) * 2,
                                        vocab_size=32000, seed=seed, slos=slos, warmup_requests=4 if not rows else 0)
                s = served(port, cfg, pid, Path(args.profile) if args.profile else None, f"{name}_c{c}_r{r}")
                s.pop("_result")
                p = "" if name == "served" else f"{name}_"
                row.update({f"{p}served_tok_s": s["output_token_throughput"],
                            f"{p}ratio": s["output_token_throughput"] / off["output_token_throughput"],
                            f"{p}ttft_p50": s["ttft_ms"]["p50"], f"{p}ttft_p99": s["ttft_ms"]["p99"],
                            f"{p}itl_p50": s["itl_ms"]["p50"], f"{p}failed": s["failed"],
                            f"{p}client_cpu": s["client_cpu_share"], f"{p}server_cpu": s["server_cpu_share"], name: s})
            rows.append(row)
            print(format_table([row], closed_cols(servers)), flush=True)
    return rows


def closed_cols(servers) -> list[str]:
    cols = ["round", "clients", "offline_tok_s"]
    for name in servers:
        p = "" if name == "served" else f"{name}_"
        cols += [f"{p}{k}" for k in ("served_tok_s", "ratio", "ttft_p50", "ttft_p99", "itl_p50", "failed",
                                     "client_cpu", "server_cpu")]
    return cols


OPEN_COLS = ["rate", "load", "completed", "failed", "request_throughput", "output_token_throughput", "ttft_p50",
             "ttft_p99", "tpot_p50", "tpot_p99", "itl_p99", "e2e_p99", "client_cpu", "server_cpu"]


def open_loop(args, port: int, pid: int, rates: list[tuple[float, float | None]], slos: dict) -> list[dict]:
    """Poisson runs, one per (rate, fraction of capacity or None)."""
    runs = []
    for i, (rate, frac) in enumerate(rates):
        cfg = OpenAIBenchConfig("llama34m", rate=rate, num_requests=args.num_requests,
                                input_len=(args.input_len,) * 2, output_len=tuple(args.output_len),
                                vocab_size=32000, seed=args.seed, slos=slos)
        s = served(port, cfg, pid, None, f"open_{rate:g}")
        result = s.pop("_result")
        print(f"\n== {rate:g} req/s Poisson" + (f" ({frac:.0%} of capacity)" if frac else "")
              + f", {args.num_requests} requests", flush=True)
        print(format_summary(s), flush=True)
        print(f"load generator CPU {s['client_cpu_s']:.1f} s ({s['client_cpu_share']:.1%} of one core), "
              f"server {s['server_cpu_s']:.1f} s ({s['server_cpu_share']:.1%})")
        runs.append({"rate": rate, "load": frac, "late_arrivals": result.late_arrivals, **s})
        if args.plot and i == len(rates) - 1:
            plot(result, args.plot)
    return runs


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--closed", type=int, nargs="*", default=[16, 64], help="closed-loop client counts")
    ap.add_argument("--rounds", type=int, default=2, help="offline/served closed-loop pairs, interleaved")
    ap.add_argument("--waves", type=int, default=3, help="closed loop: requests per client (offline: batches)")
    ap.add_argument("--load-fractions", type=float, nargs="*", default=[0.5, 0.9],
                    help="Poisson runs at these fractions of the served closed-loop capacity")
    ap.add_argument("--rate", type=float, nargs="*", default=[], help="more Poisson runs at these requests/s")
    ap.add_argument("--num-requests", type=int, default=200, help="per Poisson run")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, nargs=2, default=[128, 128], metavar=("MIN", "MAX"),
                    help="Poisson runs: uniform in [MIN, MAX]; closed loop and offline: MAX")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the offline engine")
    ap.add_argument("--offline-main-thread", action="store_true", help="run the offline engine on the main thread")
    ap.add_argument("--slo", nargs="*", default=["ttft_ms=500", "tpot_ms=100"], metavar="KEY=MS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-src", help="also serve from this src/ folder (e.g. main's) in the closed-loop runs, "
                    "interleaved, reported with the prefix base_")
    ap.add_argument("--engine-process", action="store_true",
                    help="serve with engine_core: thread, and also with engine_core: process (the engine in a "
                    "process of its own) in the closed-loop runs, interleaved, reported with the prefix process_")
    ap.add_argument("--profile", help="folder for py-spy GIL profiles of the server (closed-loop runs)")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_serving.json"))
    ap.add_argument("--plot", help="PNG of the last Poisson run's CDFs and latency over time")
    args = ap.parse_args()
    if args.profile and not shutil.which("py-spy"):
        ap.error("--profile needs py-spy on the PATH")
    return args


SUMMARY_KEYS = ("served_tok_s", "ratio", "ttft_p99", "client_cpu", "server_cpu")


def summary_rows(closed: list[dict], servers) -> list[dict]:
    """Per client count: the medians over the rounds (the ratios are per round: served and offline
    ran side by side)."""
    import statistics

    out = []
    keys = ["offline_tok_s"] + [("" if n == "served" else f"{n}_") + k for n in servers for k in SUMMARY_KEYS]
    for c in sorted({r["clients"] for r in closed}):
        rs = [r for r in closed if r["clients"] == c]
        out.append({"clients": c, **{k: statistics.median(r[k] for r in rs) for k in keys}})
    return out


def main() -> int:
    args = parse_args()
    slos = {k: float(v) for k, v in (s.split("=", 1) for s in args.slo)}
    load_before = os.getloadavg()  # others' load on the shared cores: figures mean little above ~2
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_repository(Path(tmp), args.engine_process)
        offline = Offline(Path(tmp) / "llama34m" / "1", args.threads, args.offline_main_thread) if args.closed else None
        procs = {"served": start_server(Path(tmp))}
        if args.compare_src:
            procs["base"] = start_server(Path(tmp), args.compare_src)
        if args.engine_process:
            procs["process"] = start_server(Path(tmp) / "process")
        servers = {name: (int(url.rsplit(":", 1)[1]), proc.pid) for name, (proc, url) in procs.items()}
        try:
            closed = closed_loop(args, servers, offline, slos) if args.closed else []
            capacity = max((r["served"]["request_throughput"] for r in closed), default=0.0)
            rates = [(f * capacity, f) for f in args.load_fractions if capacity] + [(r, None) for r in args.rate]
            runs = open_loop(args, *servers["served"], rates, slos)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(30)
    print(f"\nLlama {n_params / 1e6:.1f}M float32 on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{args.input_len}-token prompts; closed loop {args.output_len[1]} tokens, Poisson "
          f"{args.output_len[0]}-{args.output_len[1]}; SLOs {slos}; times in ms; *_cpu: CPU seconds per second; "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    summary = summary_rows(closed, servers)
    if closed:
        print("\nclosed loop, offline engine vs served (medians of the rounds" +
              (f"; base_: served from {args.compare_src}" if args.compare_src else "") + ")")
        print(format_table(summary, list(summary[0])))
    rows = [{**r, "ttft_p50": r["ttft_ms"]["p50"], "ttft_p99": r["ttft_ms"]["p99"], "tpot_p50": r["tpot_ms"]["p50"],
             "tpot_p99": r["tpot_ms"]["p99"], "itl_p99": r["itl_ms"]["p99"], "e2e_p99": r["e2e_ms"]["p99"],
             "client_cpu": r["client_cpu_share"], "server_cpu": r["server_cpu_share"]} for r in runs]
    if rows:
        print(f"\nPoisson arrivals (load: fraction of the served capacity {capacity:.2f} req/s)")
        print(format_table(rows, OPEN_COLS))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                          "params": n_params, "engine": ENGINE, "input_len": args.input_len,
                          "output_len": args.output_len, "slos": slos, "compare_src": args.compare_src,
                          "load_average": [load_before[0], os.getloadavg()[0]], "closed": closed, "summary": summary,
                          "capacity_req_s": capacity, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
