"""A decoder's architecture, read from a Hugging Face ``config.json``.

Handles both layouts of the RoPE fields: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
``rope_parameters`` (transformers 5). An unsupported architecture or a missing field is one
ValueError naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

LLAMA_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3"}
ARCHITECTURES = {**LLAMA_FAMILY, "GPT2LMHeadModel": "gpt2"}


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str
    family: str  # llama | qwen2 | qwen3 | gpt2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the norm's epsilon (LayerNorm's for GPT-2)
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None and not archs and d.get("model_type") == "gpt2":
            arch = "GPT2LMHeadModel"
        if arch is None:
            raise ValueError(f"config.json: architecture {archs or d.get('model_type')} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")

        def need(key):
            if key not in d:
                raise ValueError(f"config.json: missing field '{key}'")
            return d[key]

        if arch == "GPT2LMHeadModel":
            return cls._gpt2(d, need)

        family = LLAMA_FAMILY[arch]
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = dict(d.get("rope_parameters") or {})
        scaling = dict(d.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0)
        if rope and not scaling:
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            architecture=arch, family=family, vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=family == "qwen3", eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        )

    @classmethod
    def _gpt2(cls, d: dict, need) -> "DecoderConfig":
        hidden, heads = int(need("n_embd")), int(need("n_head"))
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"config.json: activation_function '{act}' is not supported for GPT-2 (gelu_new)")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if d.get(flag):
                raise ValueError(f"config.json: '{flag}: true' is not supported for GPT-2")
        if d.get("scale_attn_weights") is False:
            raise ValueError("config.json: 'scale_attn_weights: false' is not supported for GPT-2")
        eos = d.get("eos_token_id")
        return cls(
            architecture="GPT2LMHeadModel", family="gpt2", vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(d.get("n_inner") or 4 * hidden), num_layers=int(need("n_layer")),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), rope_theta=0.0,
            max_position_embeddings=int(need("n_positions")),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        )

    @classmethod
    def from_dir(cls, path: Path | str) -> "DecoderConfig":
        p = Path(path) / "config.json"
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ValueError(f"{p} is missing") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
