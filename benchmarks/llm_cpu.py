"""LLM decode throughput on CPU (issue: generative large models): rtserve's engine against
Hugging Face transformers ``generate()`` (static batching) on the same random weights, side by side.

Model: Llama architecture, ~34M parameters (hidden 512, 6 layers, 8 heads, 4 KV heads, intermediate
1408, vocab 32000, tied embeddings), float32, 2 threads; 32-token prompts, 128 new tokens, EOS
ignored; output tokens/s = all generated tokens / wall time (prefill included). The two run in turns,
``--repeats`` times, and each one's best run is reported.

    python benchmarks/llm_cpu.py [--concurrency 1 16 64] [--new-tokens 128] [--out benchmarks/results/llm_cpu.json]
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

from rtserve.bench.report import format_table, write_json  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402


def build(path: Path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model, sum(p.numel() for p in model.parameters())


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, 31000, (n, length), generator=g).tolist()


def run_transformers(model, ps, new_tokens) -> float:
    ids = torch.tensor(ps)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == new_tokens
    return len(ps) * new_tokens / dt


def run_rtserve(llm: LLM, ps, new_tokens) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate(ps, params)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in out)
    return len(ps) * new_tokens / dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two this many times, keep each one's best")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, n_params = build(Path(tmp))
        llm = LLM(tmp, num_blocks=(max(args.concurrency) * (args.prompt_tokens + args.new_tokens)) // 16 + 64,
                  block_size=16, max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096)
        for c in args.concurrency:
            ps = prompts(c, args.prompt_tokens)
            run_rtserve(llm, ps[:1], 4)  # warm up
            ours = theirs = 0.0
            for _ in range(args.repeats):  # interleaved, best of each: the machine is shared and noisy
                ours = max(ours, run_rtserve(llm, ps, args.new_tokens))
                theirs = max(theirs, run_transformers(model, ps, args.new_tokens))
            rows.append({"concurrency": c, "rtserve_tok_s": ours, "transformers_tok_s": theirs,
                         "ratio": ours / theirs})
            print(format_table([rows[-1]], list(rows[-1])), flush=True)
    print(f"\nLlama {n_params / 1e6:.1f}M params, float32, {args.threads} threads, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
    print(format_table(rows, list(rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "params": n_params, "threads": args.threads,
                          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
