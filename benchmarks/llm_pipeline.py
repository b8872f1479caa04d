"""LLM pipeline parallelism on CPU (issue: split models): the 34M Llama of ``llm_cpu.py`` run whole
(one process, 2 threads) and as 2 stages in 2 worker processes (1 thread each), with each step cut
into 1 or 2 micro-batches that overlap in the stages. Output tokens/s of ``generate`` (32-token
prompts, 128 new tokens, greedy, EOS ignored), in turns, best of ``--repeats``; greedy outputs are
checked equal to the whole model's.

    python benchmarks/llm_pipeline.py [--concurrency 1 16 64] [--out benchmarks/results/llm_pipeline.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from llm_cpu import build, prompts, run_rtserve  # noqa: E402
from rtserve.bench.report import format_table, write_json  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "llm_pipeline.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        kw = dict(num_blocks=max(args.concurrency) * (32 + args.new_tokens) // 16 + 64, block_size=16,
                  max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096)
        engines = {"whole": LLM(tmp, **kw),
                   "2 stages, 1 micro-batch": LLM(tmp, pipeline_stages=2, pipeline_micro_batches=1, **kw),
                   "2 stages, 2 micro-batches": LLM(tmp, pipeline_stages=2, pipeline_micro_batches=2, **kw)}
        try:
            for c in args.concurrency:
                ps = prompts(c, 32)
                want = engines["whole"].generate_greedy(ps[:4], max_tokens=16)
                best = {}
                for name, llm in engines.items():
                    assert llm.generate_greedy(ps[:4], max_tokens=16) == want, name
                for _ in range(args.repeats):
                    for name, llm in engines.items():
                        best[name] = max(best.get(name, 0.0), run_rtserve(llm, ps, args.new_tokens))
                row = {"concurrency": c, **{f"{n} tok/s": v for n, v in best.items()}}
                rows.append(row)
                print(format_table([row], list(row)), flush=True)
        finally:
            for llm in engines.values():
                if hasattr(llm.runner, "stages"):
                    llm.runner.close()
    print(format_table(rows, list(rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
