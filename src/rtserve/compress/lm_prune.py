"""Structured pruning of Llama-family checkpoints: remove FFN neurons and whole attention head
groups, so every matrix gets physically smaller (Hugging Face configs hold one size for all layers,
so every layer keeps the same count).

- FFN neurons: neuron j of a layer is row j of gate and up and column j of down; its importance is
  ``||gate_j|| * ||up_j|| * ||down_:,j||`` (weight magnitudes, no data needed); the top
  ``(1 - ratio) * intermediate_size`` stay, rounded to a multiple of 16.
- Heads (``heads=True``): a KV head and the query heads that share it (its GQA group) go together;
  importance is the norm of the group's q, k, v rows and o columns. The same ratio applies.

The result is a checkpoint folder (new ``config.json``, tokenizer copied) the engine serves, and
the natural start for distillation from the original (``rtserve compress --distill``).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import CompressError
from .lm_distill import TOKENIZER_FILES

COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _load(path: Path) -> dict[str, torch.Tensor]:
    from ..llm.weights import checkpoint_files

    out = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def prune_lm(src: Path, dst: Path, ratio: float, heads: bool = False) -> dict:
    from ..llm.config import DecoderConfig
    from ..llm.quant_linear import SIDECAR

    src, dst = Path(src), Path(dst)
    if not 0.0 < ratio < 1.0:
        raise CompressError(f"--prune {ratio}: the ratio must be in (0, 1)")
    try:
        c = DecoderConfig.from_dir(src)
    except ValueError as e:
        raise CompressError(str(e)) from None
    if c.family == "gpt2":
        raise CompressError("structured pruning of language models supports the Llama family")
    if (src / SIDECAR).is_file():
        raise CompressError(f"{src} is quantized: prune the unquantized checkpoint, then quantize")
    w = _load(src)
    keep_inter = max(16, int(round((1.0 - ratio) * c.intermediate_size / 16)) * 16)
    group = c.num_heads // c.num_kv_heads
    keep_kv = max(1, math.ceil((1.0 - ratio) * c.num_kv_heads)) if heads else c.num_kv_heads
    d = c.head_dim
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        g, u, dn = (w[p + f"mlp.{n}_proj.weight"].float() for n in ("gate", "up", "down"))
        score = g.norm(dim=1) * u.norm(dim=1) * dn.norm(dim=0)
        idx = score.topk(keep_inter).indices.sort().values
        for n, dim in (("gate", 0), ("up", 0), ("down", 1)):
            t = w[p + f"mlp.{n}_proj.weight"]
            w[p + f"mlp.{n}_proj.weight"] = t.index_select(dim, idx).contiguous()
        if heads and keep_kv < c.num_kv_heads:
            a = p + "self_attn."
            q = w[a + "q_proj.weight"].float().view(c.num_kv_heads, group * d, -1)
            k = w[a + "k_proj.weight"].float().view(c.num_kv_heads, d, -1)
            v = w[a + "v_proj.weight"].float().view(c.num_kv_heads, d, -1)
            o = w[a + "o_proj.weight"].float().view(-1, c.num_kv_heads, group * d)
            score = (q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt()
            kv = score.topk(keep_kv).indices.sort().values
            qrows = (kv[:, None] * group * d + torch.arange(group * d)[None]).reshape(-1)
            krows = (kv[:, None] * d + torch.arange(d)[None]).reshape(-1)
            w[a + "q_proj.weight"] = w[a + "q_proj.weight"].index_select(0, qrows).contiguous()
            w[a + "o_proj.weight"] = w[a + "o_proj.weight"].index_select(1, qrows).contiguous()
            for n in ("k", "v"):
                w[a + f"{n}_proj.weight"] = w[a + f"{n}_proj.weight"].index_select(0, krows).contiguous()
            for n, rows in (("q", qrows), ("k", krows), ("v", krows)):
                if a + f"{n}_proj.bias" in w:
                    w[a + f"{n}_proj.bias"] = w[a + f"{n}_proj.bias"].index_select(0, rows).contiguous()
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = keep_inter
    if heads:
        cfg["num_key_value_heads"] = keep_kv
        cfg["num_attention_heads"] = keep_kv * group
        cfg["head_dim"] = d  # the hidden size no longer equals heads x head_dim
    dst.mkdir(parents=True, exist_ok=True)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in set(COPY) | set(TOKENIZER_FILES):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    return {"method": "prune-structured-lm", "ratio": ratio, "intermediate_size": [c.intermediate_size, keep_inter],
            "kv_heads": [c.num_kv_heads, keep_kv], "attention_heads": [c.num_heads, keep_kv * group],
            "criterion": "weight norms (FFN: |gate_j| |up_j| |down_j|; heads: per GQA group)"}
