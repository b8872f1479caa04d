"""GPT-2 written for ragged batches over a paged KV cache: learned absolute positions, pre-LayerNorm
blocks, fused qkv (``c_attn``), tanh-approximated GELU, LM head tied to the token embedding.

Hugging Face stores GPT-2's projections as ``Conv1D`` with weights laid out (in, out), qkv already
fused; for inference each becomes a ``FrozenLinear``.
Module names follow Hugging Face's so weights map by name.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionMetadata, paged_attention
from ..config import DecoderConfig
from ..frozen_linear import FrozenLinear
from . import register_architecture


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 linear layer: weight (in, out), ``y = x @ W + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def freeze(self) -> None:
        """Inference from here on: a ``FrozenLinear`` (oneDNN-packed on CPU); the parameters go."""
        self.frozen = FrozenLinear(self.weight.t(), self.bias)
        self.weight = self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = getattr(self, "frozen", None)
        return frozen(x) if frozen is not None else torch.addmm(self.bias, x, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.nh, self.hd = c.num_heads, c.head_dim
        self.c_attn = Conv1D(c.hidden_size, 3 * c.hidden_size)
        self.c_proj = Conv1D(c.hidden_size, c.hidden_size)
        self.scale = c.head_dim ** -0.5

    def forward(self, x, kv_cache, meta: AttentionMetadata):
        t = x.shape[0]
        qkv = self.c_attn(x).view(t, 3, self.nh, self.hd)
        out = paged_attention(qkv[:, 0], qkv[:, 1:].transpose(0, 1), kv_cache, meta, self.scale)
        return self.c_proj(out.reshape(t, self.nh * self.hd))


class GPT2MLP(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(c.hidden_size, c.intermediate_size)
        self.c_proj = Conv1D(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x, kv_cache, meta):
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)


@register_architecture("gpt2")
class GPT2LMHeadModel(nn.Module):
    """Same step interface as the Llama family: forward(input_ids (T,), positions (T,), kv_caches,
    meta, logits_index (N,)) -> logits (N, vocab)."""

    tied_weights = ("lm_head.weight", "transformer.wte.weight")

    def __init__(self, c: DecoderConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = c
        self.transformer = GPT2Body(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """Map a checkpoint tensor name to ours; None skips it. The original OpenAI checkpoints on
        the hub lack the ``transformer.`` prefix and carry the causal-mask buffers ``attn.bias`` /
        ``attn.masked_bias``, which are not weights."""
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            return "transformer." + name
        return name

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def prepare_for_inference(self, quantized=None) -> None:
        """Freeze the matmuls; on CPU the LM head as a packed copy too (see the Llama module)."""
        for m in self.modules():
            if isinstance(m, Conv1D):
                m.freeze()
        w = self.lm_head.weight
        self._head = FrozenLinear(w) if w.device.type == "cpu" else None

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_index):
        body = self.transformer
        x = body.wte(input_ids) + body.wpe(positions)
        for block, cache in zip(body.h, kv_caches):
            x = block(x, cache, meta)
        x = body.ln_f(x[logits_index])
        head = getattr(self, "_head", None)
        return (head(x) if head is not None else self.lm_head(x)).float()
