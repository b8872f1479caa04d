"""Speculative decoding on CPU: n-gram (prompt lookup) and draft-model speculation against plain
decoding, side by side and interleaved, at 1 and 16 sequences, on an extractive task and on the
cases where nothing is accepted.

The model is the 34M Llama of ``llm_cpu.py`` (hidden 512, 6 layers, 8 heads, 4 KV heads, vocab
32000), float32, with its head untied. Random weights do not copy text, so the copying is made
honestly by construction and the cases are named for what they are:

- ``extractive``: the weights make the model continue a fixed chain of tokens (the attention and MLP
  outputs are scaled by ``--mix``, so the residual stream is the token's embedding plus a little of
  the context; the head maps token t to sigma(t), sigma a random permutation). Each prompt holds a
  512-token passage of that chain, 16 other tokens, then a token from the middle of the passage: the
  model's greedy output copies the passage from there. The best case for prompt lookup. Every
  matmul and attention of the real model still runs, so a step costs what the 34M model's costs.
- ``extractive-noisy``: the same with ``--noisy-mix`` (one case per value): the context moves the
  model off the chain now and then, so part of the proposals are rejected and part of the output is
  not in the prompt at all. ``accepted_share`` is the share of output tokens that were accepted
  proposals (at most K / (K + 1): each verifying step adds one token of the model's own).
- ``extractive-edited``: the clean model, but every m-th token of the prompt's passage
  (``--edit-every``, one case per value) is replaced by another: the output copies spans of m - 1
  tokens with an edit between, as a summary quoting its source does. Each edit costs a rejected
  proposal and the steps until the lookup finds the passage again.
- ``nothing-matched``: random prompts; prompt lookup finds no n-gram (min 2): the cost of looking.
- ``all-rejected``: every third token of the passage's chain is replaced by another, so each n-gram
  the lookup finds is followed by a wrong token, and the draft model (``--draft``) follows another
  permutation: every proposal is rejected (proposals back off after misses). The worst case.

``--draft`` adds draft-model speculation with a 2-layer, 256-wide model built the same way (same
sigma). Output tokens/s = generated tokens / wall time, prefill included, prefix caching off (each
document is new). Median of ``--rounds`` interleaved rounds.

    nice python benchmarks/llm_speculative.py [--rounds 3] [--concurrency 1 16] [--out benchmarks/results/llm_speculative.json]
"""
from __future__ import annotations

import argparse
import statistics
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

VOCAB, PASSAGE, GAP = 32000, 512, 16


def build(path: Path, sigma: torch.Tensor, mix: float, hidden=512, layers=6, inter=1408, heads=8, kv=4, seed=0):
    """A Llama whose greedy next token is sigma(current token), nudged by the context by ``mix``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=2048, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)  # the embeddings and head depend on sigma only: draft and target agree
    with torch.no_grad():
        emb = torch.randn(VOCAB, hidden, generator=g)
        model.model.embed_tokens.weight.copy_(emb)
        unit = emb / emb.norm(dim=1, keepdim=True)
        head = torch.empty_like(unit)
        head[sigma] = unit  # row sigma(t) is token t's direction: logits peak at sigma(t)
        model.lm_head.weight.copy_(head * 4.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(mix)
            layer.mlp.down_proj.weight.mul_(mix)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def chain(sigma: torch.Tensor, start: int, n: int) -> list[int]:
    out, t = [], start
    for _ in range(n):
        out.append(t)
        t = int(sigma[t])
    return out


def prompts(case: str, n: int, sigma: torch.Tensor, other: torch.Tensor, edit_every: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        filler = torch.randint(0, VOCAB, (GAP,), generator=g).tolist()
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        if case == "nothing-matched":
            out.append(torch.randint(0, VOCAB, (PASSAGE + GAP + 1,), generator=g).tolist())
            continue
        passage = chain(sigma, start, PASSAGE)
        every = 3 if case == "all-rejected" else edit_every if case == "extractive-edited" else 0
        at = PASSAGE // 4
        if every:  # every m-th token of the chain replaced; all-rejected (m = 3): each match proposes a wrong token
            passage = [t if i % every != every - 1 else int(other[t]) for i, t in enumerate(passage)]
            at = -(-at // every) * every  # start on a chain token (index % m == 0)
        out.append(passage + filler + [passage[at]])
    return out


def timed(llm: LLM, ps: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate(ps, params)
    dt = time.perf_counter() - t0
    return len(ps) * new_tokens / dt, [o.outputs[0].token_ids for o in out]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-tokens", type=int, default=4, help="K: tokens proposed per step")
    ap.add_argument("--mix", type=float, default=0.0)
    ap.add_argument("--noisy-mix", type=float, nargs="+", default=[15.0],
                    help="extractive-noisy: one case per value (larger: the model leaves the passage more often)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", action="store_true")
    ap.add_argument("--edit-every", type=int, nargs="+", default=[8, 16, 32],
                    help="extractive-edited: one case per value (every m-th passage token replaced)")
    ap.add_argument("--cases", nargs="+", default=["extractive", "extractive-edited", "extractive-noisy",
                                                    "nothing-matched", "all-rejected"])
    ap.add_argument("--out", default=str(HERE / "results" / "llm_speculative.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(3)
    sigma, other = torch.randperm(VOCAB, generator=g), torch.randperm(VOCAB, generator=g)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_params = build(root / "clean", sigma, args.mix)
        noisy = [root / f"noisy-{m:g}" for m in args.noisy_mix] if "extractive-noisy" in args.cases else []
        for m, path in zip(args.noisy_mix, noisy):
            build(path, sigma, m)
        small = dict(hidden=256, layers=2, inter=704, heads=4, kv=2, seed=1)
        if args.draft:
            for path in [root / "clean", *noisy]:
                build(path / "draft", sigma, args.mix, **small)
            build(root / "clean" / "draft-wrong", other, args.mix, **small)
        for case in args.cases:
            if case == "extractive-noisy":
                variants = [(m, path, 0) for m, path in zip(args.noisy_mix, noisy)]
            elif case == "extractive-edited":
                variants = [(args.mix, root / "clean", m) for m in args.edit_every]
            else:
                variants = [(args.mix, root / "clean", 0)]
            for mix, path, every in variants:
                rows += run_case(case, path, sigma, other, args, mix=mix, edit_every=every)
    print(f"\nLlama {n_params / 1e6:.1f}M params, float32, {args.threads} threads, {PASSAGE + GAP + 1}-token prompts, "
          f"{args.new_tokens} new tokens, K = {args.num_tokens}, median of {args.rounds} interleaved rounds")
    print(format_table(rows, list(rows[0])))
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "params": n_params, "threads": args.threads,
                          "prompt_tokens": PASSAGE + GAP + 1, "new_tokens": args.new_tokens,
                          "num_tokens": args.num_tokens, "rounds": args.rounds, "rows": rows})
    return 0


def run_case(case: str, path: Path, sigma, other, args, mix: float, edit_every: int) -> list[dict]:
    c_max = max(args.concurrency)
    common = dict(num_blocks=c_max * (PASSAGE + GAP + args.new_tokens + 64) // 16 + 16, block_size=16,
                  max_num_seqs=c_max, max_num_batched_tokens=4096, enable_prefix_caching=False)
    engines = {"plain": LLM(path, **common),
               "ngram": LLM(path, **common, speculative={"method": "ngram", "num_tokens": args.num_tokens})}
    if args.draft and case != "nothing-matched":
        engines["draft"] = LLM(path, **common, speculative={
            "method": "draft", "num_tokens": args.num_tokens, "draft": "draft-wrong" if case == "all-rejected" else "draft"})
    rows = []
    for c in args.concurrency:
        ps = prompts(case, c, sigma, other, edit_every)
        for llm in engines.values():
            timed(llm, ps[:1], 4)  # warm up
            if llm.speculator is not None:
                llm.speculator.stats.__init__(accepted_per_pos=[0] * args.num_tokens)
        speeds = {name: [] for name in engines}
        outputs = {}
        for r in range(args.rounds):  # the order alternates, so neither side always runs first
            for name, llm in (list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]):
                tok_s, outputs[name] = timed(llm, ps, args.new_tokens)
                speeds[name].append(tok_s)
        assert all(o == outputs["plain"] for o in outputs.values()), f"{case}: speculation changed greedy tokens"
        plain = statistics.median(speeds["plain"])
        for name in engines:
            if name == "plain":
                continue
            st = engines[name].speculator.stats
            tok_s = statistics.median(speeds[name])
            generated = args.rounds * c * args.new_tokens
            rows.append({"case": case, "mix": mix, "edit_every": edit_every, "concurrency": c, "method": name, "plain_tok_s": plain,
                         "spec_tok_s": tok_s, "ratio": tok_s / plain,
                         "accepted_share": st.num_accepted_tokens / generated,
                         "acceptance": st.num_accepted_tokens / st.num_draft_tokens if st.num_draft_tokens else 0.0,
                         "tokens_per_verify": st.num_emitted_tokens / st.num_drafts if st.num_drafts else 0.0,
                         "verified_seq_steps": st.num_drafts,
                         "round_ratios": [round(x / y, 3) for x, y in zip(speeds[name], speeds["plain"])]})
            print(format_table([rows[-1]], list(rows[-1])), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
