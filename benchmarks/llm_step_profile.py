"""Where a decode step's time goes, on the 34M Llama of ``llm_cpu.py``: torch.profiler op counts and
self time per decode step, and cProfile's cumulative share of ``engine.step`` for the scheduler,
``prepare``, the model and the sampler, at each concurrency. Run from the repository root whose
``src`` is to be profiled (cProfile inflates Python time: read its shares as upper bounds).

    python benchmarks/llm_step_profile.py [--concurrency 1 16 64] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llm_cpu import build, prompts  # noqa: E402  (puts this tree's src on the path)

from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

PARTS = {"schedule": ("scheduler.py", "schedule"), "update": ("scheduler.py", "update"),
         "prepare": ("model_runner.py", "prepare"), "_sample (engine)": ("engine.py", "_sample"),
         "sample()": ("sampler.py", "sample"), "step": ("engine.py", "step")}


def op_table(llm: LLM, ps, params, steps: int) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(ps, params)
    ev = prof.key_averages()
    print(f"  profiler events per step (all levels): {sum(e.count for e in ev) / steps:.0f}")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"   {e.key:50s} {e.count / steps:7.1f}/step  self {e.self_cpu_time_total / 1000 / steps:8.3f} ms/step")


def python_shares(llm: LLM, ps, params) -> None:
    pr = cProfile.Profile()
    pr.enable()
    llm.generate(ps, params)
    pr.disable()
    stats = pstats.Stats(pr).stats
    cum = {k: sum(v[3] for (f, _, n), v in stats.items() if f.endswith(fn) and n == name)
           for k, (fn, name) in PARTS.items()}
    print("  share of engine.step: " + ", ".join(f"{k} {v / cum['step'] * 100:.1f}%" for k, v in cum.items()
                                                  if k != "step"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        c_max = max(args.concurrency)
        llm = LLM(tmp, num_blocks=c_max * 160 // 16 + 64, block_size=16, max_num_seqs=c_max,
                  max_num_batched_tokens=4096)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        for c in args.concurrency:
            ps = prompts(c, 32)
            llm.generate(ps[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            t0 = time.perf_counter()
            llm.generate(ps, params)
            dt = time.perf_counter() - t0
            print(f"c={c}: {c * args.new_tokens / dt:.0f} tok/s, {dt / args.new_tokens * 1000:.2f} ms/step")
            op_table(llm, ps, params, args.new_tokens)
            python_shares(llm, ps, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
