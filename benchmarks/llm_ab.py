"""Two source trees of rtserve side by side on one machine: the engine of ``--a`` (e.g. main's
checkout) against the engine of ``--b`` (e.g. a branch), on the 34M Llama of ``llm_cpu.py``.

Each side is a worker process that imports rtserve from its own tree and loads the checkpoint once;
runs alternate A, B, A, B, ... so both see the same machine, and the report keeps each side's best
run (the least disturbed on a shared machine) and the median of the per-round ratios. Tokens per
CPU-second (process time) are reported too: with ``--threads 1`` they measure the work done, which
other processes on the same cores do not change (spinning OpenMP threads make them meaningless with
more than one thread).

    python benchmarks/llm_ab.py --a /work/main/src --b src [--concurrency 1 16 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
sys.path.insert(0, sys.argv[1])
from rtserve.llm.engine import LLM
from rtserve.llm.sampling_params import SamplingParams
cfg = json.loads(sys.argv[4])
t0 = time.perf_counter()
llm = LLM(sys.argv[2], **cfg)
print(json.dumps({"load_s": time.perf_counter() - t0}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    params = SamplingParams(max_tokens=req["new_tokens"], temperature=0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    out = llm.generate(req["prompts"], params)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(o.outputs[0].token_ids) for o in out)
    print(json.dumps({"tok_s": n / dt, "tok_cpu_s": n / cpu, "tokens": [o.outputs[0].token_ids for o in out]}),
          flush=True)
"""


def start(src: str, ckpt: str, threads: int, cfg: dict) -> tuple[subprocess.Popen, float]:
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(Path(src).resolve()), ckpt, str(threads), json.dumps(cfg)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ})
    return p, json.loads(p.stdout.readline())["load_s"]


def ask(p: subprocess.Popen, prompts, new_tokens: int) -> dict:
    p.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main() -> int:
    sys.path.insert(0, str(HERE))
    from llm_cpu import build, prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="src folder of side A (the baseline)")
    ap.add_argument("--b", required=True, help="src folder of side B")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        cfg = dict(num_blocks=(max(args.concurrency) * (args.prompt_tokens + args.new_tokens)) // 16 + 64,
                   block_size=16, max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096)
        (pa, la), (pb, lb) = start(args.a, tmp, args.threads, cfg), start(args.b, tmp, args.threads, cfg)
        print(f"load: A {la:.2f} s, B {lb:.2f} s", flush=True)
        try:
            for c in args.concurrency:
                ps = prompts(c, args.prompt_tokens)
                ask(pa, ps[:1], 4), ask(pb, ps[:1], 4)  # warm up
                a, b, ca, cb, same = [], [], [], [], True
                for r in range(args.rounds):
                    first, second = ((pa, a, ca), (pb, b, cb)) if r % 2 == 0 else ((pb, b, cb), (pa, a, ca))
                    ra = ask(first[0], ps, args.new_tokens)
                    time.sleep(0.3)
                    rb = ask(second[0], ps, args.new_tokens)
                    time.sleep(0.3)
                    first[1].append(ra["tok_s"]), second[1].append(rb["tok_s"])
                    first[2].append(ra["tok_cpu_s"]), second[2].append(rb["tok_cpu_s"])
                    same &= ra["tokens"] == rb["tokens"]
                ratios = [y / x for x, y in zip(a, b)]
                print(f"c={c:3d}  A best {max(a):7.1f} tok/s  B best {max(b):7.1f} tok/s  best ratio B/A "
                      f"{max(b) / max(a):.2f}  median round ratio {statistics.median(ratios):.2f}  "
                      f"| per CPU-second: A {max(ca):7.1f} B {max(cb):7.1f} ratio {max(cb) / max(ca):.2f} | "
                      f"same greedy tokens: {same}", flush=True)
        finally:
            for p in (pa, pb):
                p.stdin.close()
                p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
