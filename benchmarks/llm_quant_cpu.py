"""Weight-only int8 / int4 quantization of the demo LM (the trained 3.5M-parameter Llama in
``src/rtserve/demo/data/demo-lm``), through ``rtserve compress --quantize``: weight bytes, top-1 agreement
and mean KL of next-token distributions against the unquantized model at every position of 16
passages of Python's help topics, and batch-1 decode time per token on this CPU (the demo LM is
small: its steps are mostly engine overhead, so the 34M model of ``llm_cpu.py --quant int8`` is
where int8's speed is measured).

    python benchmarks/llm_quant_cpu.py [--out benchmarks/results/llm_quant_cpu.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.report import format_table, write_json  # noqa: E402
from rtserve.compress.llm_job import run_llm_quantization  # noqa: E402
from rtserve.demo.repository import DEMO_LM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results" / "llm_quant_cpu.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, group in (("int8-weight", 128), ("int4-weight", 64), ("int4-weight", 32)):
            r = run_llm_quantization(DEMO_LM, Path(tmp) / f"{method}-{group}", method, group)
            rows.append({"method": method, "group": group if method == "int4-weight" else "-",
                         "weights_MB": r["result"]["weight_bytes"] / 1e6, "source_MB": r["source"]["weight_bytes"] / 1e6,
                         "top1_agreement": r["fidelity"]["top1_agreement"], "mean_kl": r["fidelity"]["mean_kl"],
                         "decode_ms_source": r["source"]["decode_ms_per_token_batch1"],
                         "decode_ms_quant": r["result"]["decode_ms_per_token_batch1"],
                         "positions": r["fidelity"]["positions"]})
    print(format_table(rows, list(rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "model": "demo-lm (bf16 checkpoint, run in float32)",
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
