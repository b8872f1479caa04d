"""Weight-only quantization of a native-engine checkpoint (Llama family): every projection of every
decoder layer (q, k, v, o, gate, up, down) becomes int8 per output channel or int4 in groups of
``group_size`` along the input, symmetric. Stored in safetensors as ``<name>.qweight`` (int8, or
uint8 with two int4 values a byte) and ``<name>.scales`` (float32), with the recipe in
``quantization.json``; everything else (embeddings, norms, the tokenizer) is copied unchanged. The
recipe also asks the engine for the LM head in int8 with its top 8 logits recomputed from float16,
made at load (``lm_head``, ``quant_linear.Int8Head``; the head is often the tied embedding, which the
lookup needs in float32).
The engine reads such a folder like any other (``llm/model_runner.py``).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..llm.config import DecoderConfig
from ..llm.quant_linear import METHODS, SIDECAR, pack_int4, quantize
from ..llm.weights import checkpoint_files

QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json")


def quantize_checkpoint(src: Path | str, dst: Path | str, method: str, group_size: int = 128) -> dict:
    """Write the quantized checkpoint to ``dst``; returns the recipe with byte counts."""
    src, dst = Path(src), Path(dst)
    if method not in METHODS:
        raise ValueError(f"--quantize '{method}' is not one of {', '.join(METHODS)} for a language model")
    cfg = DecoderConfig.from_dir(src)
    if cfg.family == "gpt2":
        raise ValueError("weight-only quantization supports the Llama family (GPT-2 is not built yet)")
    bits = METHODS[method]
    if bits == 4 and (cfg.hidden_size % group_size or cfg.intermediate_size % group_size):
        raise ValueError(f"int4: hidden {cfg.hidden_size} and intermediate {cfg.intermediate_size} sizes must be "
                         f"multiples of the group size {group_size}")
    if (src / SIDECAR).is_file():
        raise ValueError(f"{src} is already quantized")
    out: dict[str, torch.Tensor] = {}
    modules, before, after = [], 0, 0
    for f in checkpoint_files(src):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                before += t.numel() * t.element_size()
                if QUANTIZED.match(name):
                    q, scales = quantize(t, bits, group_size)
                    out[name + ".qweight"] = q if bits == 8 else pack_int4(q)
                    out[name + ".scales"] = scales.contiguous()
                    modules.append(name)
                else:
                    out[name] = t.contiguous()
    after = sum(t.numel() * t.element_size() for t in out.values())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    recipe = {"method": method, "bits": bits, "group_size": group_size if bits == 4 else None,
              "symmetric": True, "scales_dtype": "float32", "modules": modules,
              "bytes_before": before, "bytes_after": after}
    recipe["lm_head"] = {"dtype": "int8", "exact_top_k": 8}  # made by the engine at load (quant_linear.Int8Head)
    (dst / SIDECAR).write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe
