"""LLM decode throughput on CPU (issue: generative large models): rtserve's engine against
Hugging Face transformers ``generate()`` (static batching) on the same random weights, side by side.

Model: Llama architecture, ~34M parameters (hidden 512, 6 layers, 8 heads, 4 KV heads, intermediate
1408, vocab 32000, tied embeddings), float32, 2 threads; 32-token prompts, 128 new tokens, EOS
ignored; output tokens/s = all generated tokens / wall time (prefill included). The engines run in turns,
``--repeats`` times, and each one's best (``--stat best``) or median (``--stat median``) run is reported.
``--llamacpp`` adds llama.cpp f32 / f16 / q8_0 rows (the same checkpoint converted to GGUF, see
``llamacpp_side.py``) in the same interleaved rounds, and q4_0 (made by llama.cpp's quantizer from the
f32 GGUF) with ``--quant int4``; without llama_cpp installed they are skipped.

    python benchmarks/llm_cpu.py [--concurrency 1 16 64] [--new-tokens 128] [--llamacpp] [--repeats 3 --stat median]

``--quant int8 int4`` adds rtserve on weight-only quantized copies of the checkpoint (``rtserve compress
--quantize int8-weight|int4-weight``), run in the same interleaved rounds as rtserve float32 (and
llama.cpp): tok/s, the ratio to float32 and to llama.cpp's q8_0 (and int4's to q4_0; ``quant_columns``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

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


QUANT_METHODS = {"int8": "int8-weight", "int4": "int4-weight", "int8-panels": "int8-weight"}
#: loaded with these environment variables set: int8-panels is int8 in float-widened panels where the
#: build's default is panels of k pairs (AVX-512 VNNI), for the two side by side
QUANT_ENV = {"int8-panels": {"RTSERVE_INT8_PAIRS": "0"}}


def quant_engines(path: Path, llm: LLM, quants: list[str]) -> dict[str, LLM]:
    """name -> an engine on a weight-only quantized copy of ``path`` (``rtserve compress``'s recipe)."""
    from rtserve.compress.llm_quant import quantize_checkpoint

    engines = {}
    for name in quants:
        quantize_checkpoint(path, path / f"q-{name}", QUANT_METHODS[name])
        with mock.patch.dict(os.environ, QUANT_ENV.get(name, {})):
            engines[name] = LLM(path / f"q-{name}", llm.engine_config)
    kernels = {n: e.runner.model.model.layers[0].mlp.gate_up.kernel for n, e in engines.items()}
    print(f"quantized kernels (gate_up): {kernels}", flush=True)
    return engines


def quant_columns(samples: dict, reduce, ours: float) -> dict:
    """Each quantized engine's tok/s, against rtserve float32 and llama.cpp's q8_0 (same rounds)."""
    cols = {}
    for name in QUANT_METHODS:
        if name in samples:
            cols[f"{name}_tok_s"] = reduce(samples[name])
            cols[f"{name}_vs_f32"] = cols[f"{name}_tok_s"] / ours
            for theirs in ("q8_0", "q4_0") if name == "int4" else ("q8_0",):
                if f"llamacpp_{theirs}" in samples:
                    cols[f"{name}_vs_llamacpp_{theirs}"] = cols[f"{name}_tok_s"] / reduce(samples[f"llamacpp_{theirs}"])
    return cols


def cpu_name() -> str:
    """The CPU's model name and its vector flags, for the results file."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    vec = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return f"{name}, {os_cpus()} CPUs, {' '.join(sorted(vec))}"


def os_cpus() -> int:
    import os
    return os.cpu_count() or 1


def llamacpp_sides(args, checkpoint: Path, vocab_size: int, workdir: Path) -> dict:
    """name -> llama.cpp model for --llamacpp, or {} (with the reason printed) when llama_cpp is missing."""
    if not args.llamacpp:
        return {}
    import llamacpp_side

    if (why := llamacpp_side.available()) is not None:
        print(f"--llamacpp skipped: {why}", flush=True)
        return {}
    types = llamacpp_side.OUTTYPES + (("q4_0",) if "int4" in args.quant else ())
    ggufs = llamacpp_side.convert_all(checkpoint, workdir, vocab_size, types, converter=args.llamacpp_converter)
    return llamacpp_side.load_all(ggufs, args.threads)


def llamacpp_round(sides: dict, ps, new_tokens, samples: dict) -> None:
    import llamacpp_side

    for name, m in sides.items():
        samples.setdefault(name, []).append(llamacpp_side.throughput(m, ps, new_tokens))


def llamacpp_columns(samples: dict, reduce, ours: float) -> dict:
    cols = {}
    for name in (n for n in samples if n.startswith("llamacpp_")):
        cols[f"{name}_tok_s"] = reduce(samples[name])
        cols[f"rtserve_vs_{name}"] = ours / cols[f"{name}_tok_s"]
    return cols


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the engines this many times")
    ap.add_argument("--stat", choices=["best", "median"], default="best", help="which of the repeats to report")
    ap.add_argument("--llamacpp", action="store_true", help="add llama.cpp f32/f16/q8_0 rows (needs llama_cpp)")
    ap.add_argument("--llamacpp-converter", default=None, help="convert_hf_to_gguf.py or its folder "
                    "(else $RTSERVE_LLAMACPP_CONVERTER, the cache, or the installed version's sdist from PyPI)")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_cpu.json"))
    ap.add_argument("--quant", nargs="*", default=[], choices=list(QUANT_METHODS),
                    help="also rtserve on weight-only quantized copies, in the same rounds")
    ap.add_argument("--only-quant", action="store_true", help="skip the transformers side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    reduce = max if args.stat == "best" else statistics.median
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as gguf_dir:
        model, n_params = build(Path(tmp))
        sides = llamacpp_sides(args, Path(tmp), model.config.vocab_size, Path(gguf_dir))
        llm = LLM(tmp, num_blocks=(max(args.concurrency) * (args.prompt_tokens + args.new_tokens)) // 16 + 64,
                  block_size=16, max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096)
        quant = quant_engines(Path(tmp), llm, args.quant)
        for c in args.concurrency:
            ps = prompts(c, args.prompt_tokens)
            for e in (llm, *quant.values()):
                run_rtserve(e, ps[:1], 4)  # warm up
            for m in sides.values():
                m.generate(ps, 2)  # warm up, and make the context for c sequences outside the timing
            samples: dict[str, list[float]] = {"rtserve": [], "transformers": []}
            for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
                samples["rtserve"].append(run_rtserve(llm, ps, args.new_tokens))
                for name, e in quant.items():
                    samples.setdefault(name, []).append(run_rtserve(e, ps, args.new_tokens))
                if not args.only_quant:
                    samples["transformers"].append(run_transformers(model, ps, args.new_tokens))
                llamacpp_round(sides, ps, args.new_tokens, samples)
            ours = reduce(samples["rtserve"])
            rows.append({"concurrency": c, "rtserve_tok_s": ours})
            if samples["transformers"]:
                theirs = reduce(samples["transformers"])
                rows[-1] |= {"transformers_tok_s": theirs, "ratio": ours / theirs}
            rows[-1].update(llamacpp_columns(samples, reduce, ours))
            rows[-1].update(quant_columns(samples, reduce, ours))
            print(format_table([rows[-1]], list(rows[-1])), flush=True)
    print(f"\nLlama {n_params / 1e6:.1f}M params, float32, {args.threads} threads, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
    if rows:
        print(format_table(rows, list(rows[0])))
    for m in sides.values():
        m.close()
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "params": n_params, "threads": args.threads,
                          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                          "repeats": args.repeats, "stat": args.stat, "cpu": cpu_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
