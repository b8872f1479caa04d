"""LLM decode on a CUDA GPU (issue: generative large models), a Llama-3.2-1B-shaped model with
random bfloat16 weights (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab
128256, tied embeddings):

(a) batch-1 decode tokens/s against the memory-bandwidth limit: weight bytes / measured device copy
    bandwidth (bytes read + written per second of a 1 GiB ``copy_``);
(b) 256 requests of 128 prompt and 128 output tokens submitted at once: output tokens/s;
and, with ``--transformers``, Hugging Face ``generate()`` on the same weights at batch 1 and 128.

    python benchmarks/llm_gpu.py [--parts a b] [--transformers] [--out benchmarks/results/llm_gpu.json]

Needs only torch, safetensors and (for --transformers) transformers: no web stack.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
          "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
          "head_dim": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16",
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}


def write_checkpoint(path: Path) -> int:
    """Random bf16 weights written straight to safetensors (no transformers init); returns bytes."""
    from safetensors.torch import save_file

    c = CONFIG
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16).cpu()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s from a 1 GiB device-to-device copy (read + write)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * n / (time.perf_counter() - t0)


def decode_batch1(llm: LLM, prompt_len: int = 128, new_tokens: int = 256) -> float:
    """Steady decode tokens/s for one sequence: steps after the first token, timed one by one."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    seq = llm.make_sequences(list(range(100, 100 + prompt_len)), params)[0]
    llm.scheduler.add(seq)
    times = []
    while llm.scheduler.has_work:
        llm.step()
        times.append(time.perf_counter())
    llm.forget(seq)
    return (len(times) - 2) / (times[-1] - times[1])  # from the first decode step on


def throughput(llm: LLM, n: int, prompt_len: int, new_tokens: int) -> float:
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, 120000, (n, prompt_len), generator=g).tolist()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    dt = time.perf_counter() - t0
    assert all(len(r.outputs[0].token_ids) == new_tokens for r in out)
    return n * new_tokens / dt


def transformers_generate(path: Path, batch: int, new_tokens: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(10, 120000, (batch, 128), device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    r = batch * new_tokens / (time.perf_counter() - t0)
    del model
    torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["a", "b"])
    ap.add_argument("--transformers", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_gpu.json"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        t0 = time.perf_counter()
        weight_bytes = write_checkpoint(path)
        res["weight_bytes"] = weight_bytes
        print(f"checkpoint: {weight_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        bw = copy_bandwidth()
        res["copy_bandwidth_GBps"] = round(bw / 1e9)
        res["bandwidth_limit_tok_s"] = round(bw / weight_bytes)
        t0 = time.perf_counter()
        llm = LLM(path, dtype="bfloat16", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                  max_model_len=2048, kv_cache_memory_fraction=0.85)
        res["load_and_capture_s"] = round(time.perf_counter() - t0, 1)
        res["num_blocks"] = llm.runner.num_blocks
        print(f"engine ready in {res['load_and_capture_s']} s, {llm.runner.num_blocks} KV blocks", flush=True)
        if "a" in args.parts:
            decode_batch1(llm, new_tokens=32)  # warm
            r = decode_batch1(llm)
            res["a_batch1_decode_tok_s"] = round(r, 1)
            res["a_fraction_of_limit"] = round(r / res["bandwidth_limit_tok_s"], 3)
            print(f"(a) batch-1 decode {r:.0f} tok/s = {r / res['bandwidth_limit_tok_s']:.0%} of the "
                  f"{res['bandwidth_limit_tok_s']} tok/s bandwidth limit", flush=True)
        if "b" in args.parts:
            throughput(llm, 16, 128, 16)  # warm
            r = throughput(llm, 256, 128, 128)
            res["b_256x128_output_tok_s"] = round(r)
            print(f"(b) 256 requests x 128/128: {r:.0f} output tok/s", flush=True)
        del llm
        torch.cuda.empty_cache()
        if args.transformers:
            res["transformers_batch1_tok_s"] = round(transformers_generate(path, 1, 64), 1)
            res["transformers_batch128_tok_s"] = round(transformers_generate(path, 128, 128))
            print(f"transformers: batch 1 {res['transformers_batch1_tok_s']} tok/s, batch 128 "
                  f"{res['transformers_batch128_tok_s']} tok/s", flush=True)
    out = Path(os.environ.get("OUT", "")) / "llm_gpu.json" if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
