"""LLM serving benchmark (issue: generative large models): the real server, its OpenAI API, streamed.

Builds the ~34M Llama of benchmarks/llm_cpu.py (hidden 512, 6 layers, 8 heads, 4 KV heads,
intermediate 1408, vocab 32000, tied embeddings, float32, random weights) in a temp model repository,
starts ``rtserve serve`` on a free loopback port, and drives ``/v1/completions`` with the OpenAI bench
(rtserve.bench.openai_load): Poisson arrivals, 32-token random token-id prompts (no tokenizer
needed), output lengths uniform in [16, 256] with EOS ignored (mean 136), one stream per request
with the usage chunk. Several rates run one after another against the same server, side by side.

    python benchmarks/llm_serving.py [--rate 2] [--num-requests 200] [--plot benchmarks/results/llm_serving.png]

Client and server share the machine: on 2 cores the client's share is part of what is measured.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.openai_load import OpenAIBenchConfig, run_openai_load_sync  # noqa: E402
from rtserve.bench.openai_report import format_summary, plot  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402

ENGINE = {"num_blocks": 2048, "block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 2048,
          "max_model_len": 512}


def build_repository(root: Path) -> int:
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
    (root / "llama34m" / "model.yaml").write_text(f"backend: llm\ndevice: cpu\nengine:\n{engine}")
    return sum(p.numel() for p in model.parameters())


def start_server(repo: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port),
                             "--log-level", "warning"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, nargs="+", default=[2.0], help="requests/s, Poisson; several run in turn")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--slo", nargs="*", default=["ttft_ms=500", "tpot_ms=100"], metavar="KEY=MS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "llm_serving.json"))
    ap.add_argument("--plot", help="PNG of the last rate's CDFs and latency over time")
    args = ap.parse_args()
    slos = {k: float(v) for k, v in (s.split("=", 1) for s in args.slo)}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_repository(Path(tmp))
        proc, url = start_server(Path(tmp))
        try:
            port = int(url.rsplit(":", 1)[1])
            for i, rate in enumerate(args.rate):
                cfg = OpenAIBenchConfig("llama34m", rate=rate, num_requests=args.num_requests,
                                        input_len=(args.input_len,) * 2, output_len=tuple(args.output_len),
                                        vocab_size=32000, seed=args.seed, slos=slos,
                                        warmup_requests=4 if i == 0 else 0)
                cpu0 = time.process_time()
                result = run_openai_load_sync("127.0.0.1", port, cfg)
                client_cpu = time.process_time() - cpu0  # the load generator's share of the 2 cores
                summary = result.summary()
                print(f"\n== {rate:g} req/s Poisson, {args.num_requests} requests", flush=True)
                print(format_summary(summary), flush=True)
                print(f"client CPU {client_cpu:.1f} s ({client_cpu / summary['duration_s']:.1%} of one core)")
                runs.append({"rate": rate, "late_arrivals": result.late_arrivals, "client_cpu_s": client_cpu, **summary})
                if args.plot and i == len(args.rate) - 1:
                    plot(result, args.plot)
        finally:
            proc.terminate()
            proc.wait(30)
    cols = ["rate", "completed", "failed", "request_throughput", "output_token_throughput", "ttft_p50", "ttft_p99",
            "tpot_p50", "tpot_p99", "itl_p99", "e2e_p50", "e2e_p99", "goodput"]
    rows = [{**r, "ttft_p50": r["ttft_ms"]["p50"], "ttft_p99": r["ttft_ms"]["p99"], "tpot_p50": r["tpot_ms"]["p50"],
             "tpot_p99": r["tpot_ms"]["p99"], "itl_p99": r["itl_ms"]["p99"], "e2e_p50": r["e2e_ms"]["p50"],
             "e2e_p99": r["e2e_ms"]["p99"], "goodput": r["goodput"]["requests_per_s"]} for r in runs]
    print(f"\nLlama {n_params / 1e6:.1f}M float32 on {os.cpu_count()} CPUs, {args.input_len}-token prompts, "
          f"output {args.output_len[0]}-{args.output_len[1]} tokens, SLOs {slos} (times in ms)")
    print(format_table(rows, cols))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                          "params": n_params, "engine": ENGINE, "input_len": args.input_len,
                          "output_len": args.output_len, "num_requests": args.num_requests, "slos": slos,
                          "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
