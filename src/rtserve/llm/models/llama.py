"""The Llama family (Llama 2/3.x, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) written for
ragged batches over a paged KV cache. Module names follow Hugging Face's so weights map by name."""
from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionMetadata, paged_attention
from ..config import DecoderConfig
from ..frozen_linear import FrozenLinear
from ..quant_linear import QuantLinear, head_from_recipe
from ..rope import Rotary
from . import register_architecture


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op; same maths as below when no cast is involved
            return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig, rotary: Rotary) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        self.rotary = rotary
        self.scale = c.head_dim ** -0.5

    def fuse(self, quant: tuple[int, dict] | None = None, plain: bool = False) -> None:
        """One (hidden, (Hq + 2 Hkv) D) matmul instead of three, as a ``FrozenLinear`` (oneDNN-packed
        on CPU), or a ``QuantLinear`` when ``quant`` = (bits, {"q"|"k"|"v"|"o": (q, scales)}) gives
        the weight-only quantized tensors; the unfused modules are dropped so memory does not double.
        ``plain``: the float weights kept for the native decode layers too (``FrozenLinear``)."""
        b = (torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
             if self.q_proj.bias is not None else None)
        if quant is not None:
            bits, t = quant
            dtype = self.o_proj.weight.dtype
            self.qkv = QuantLinear(torch.cat([t[k][0] for k in "qkv"]), torch.cat([t[k][1] for k in "qkv"]), bits, b,
                                   dtype)
            self.o = QuantLinear(*t["o"], bits, dtype=dtype)
        else:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            self.qkv = FrozenLinear(w, b, plain=plain)
            self.o = FrozenLinear(self.o_proj.weight, plain=plain)
        self.q_proj = self.k_proj = self.v_proj = self.o_proj = None

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata):
        """rope: the step's tables from ``Rotary.tables``."""
        t = x.shape[0]
        if self.q_proj is None:  # fused: q and k rotated in one pass, in place in the qkv output,
            qkv = self.qkv(x)    # from where K and V go to the cache together
            nq, nkv = self.nh * self.hd, self.nkv * self.hd
            qk = qkv[:, :nq + nkv].view(t, self.nh + self.nkv, self.hd)
            src = qk
            if self.qk_norm:
                src = torch.cat([self.q_norm(qk[:, :self.nh]), self.k_norm(qk[:, self.nh:])], dim=1)
            self.rotary.rotate(src, rope, out=qk)
            q = qk[:, :self.nh]                                                # (T, Hq, D)
            kv = qkv[:, nq:].view(t, 2, self.nkv, self.hd).transpose(0, 1)     # (2, T, Hkv, D)
        else:
            q = self.q_proj(x).view(t, self.nh, self.hd)     # (T, Hq, D)
            k = self.k_proj(x).view(t, self.nkv, self.hd)    # (T, Hkv, D)
            v = self.v_proj(x).view(t, self.nkv, self.hd)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary.rotate(q, rope), self.rotary.rotate(k, rope)
            kv = torch.stack([k, v])
        out = paged_attention(q, kv, kv_cache, meta, self.scale).reshape(t, self.nh * self.hd)
        return self.o(out) if self.o_proj is None else self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def fuse(self, quant: tuple[int, dict] | None = None, plain: bool = False) -> None:
        """Gate and up in one matmul; ``FrozenLinear``s, or ``QuantLinear``s from ``quant`` (see Attention)."""
        self.inter = self.gate_proj.weight.shape[0]
        if quant is not None:
            bits, t = quant
            dtype = self.down_proj.weight.dtype
            self.gate_up = QuantLinear(torch.cat([t["gate"][0], t["up"][0]]), torch.cat([t["gate"][1], t["up"][1]]),
                                       bits, dtype=dtype)
            self.down = QuantLinear(*t["down"], bits, dtype=dtype)
        else:
            self.gate_up = FrozenLinear(torch.cat([self.gate_proj.weight, self.up_proj.weight]), plain=plain)
            self.down = FrozenLinear(self.down_proj.weight, plain=plain)
        self.gate_proj = self.up_proj = self.down_proj = None

    def forward(self, x):
        if self.gate_proj is None:  # fused
            gu = self.gate_up(x)
            return self.down(nn.functional.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig, rotary: Rotary) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, rotary)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, c: DecoderConfig, rotary: Rotary) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, rotary) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@register_architecture("llama", "qwen2", "qwen3")
class LlamaForCausalLM(nn.Module):
    """forward(input_ids (T,), positions (T,), kv_caches [attention.cache_shape] per layer,
    meta, logits_index (N,)) -> logits (N, vocab) for the tokens that are sampled."""

    tied_weights = ("lm_head.weight", "model.embed_tokens.weight")

    def __init__(self, c: DecoderConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = c
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings, device)
        self.model = LlamaBody(c, self.rotary)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def prepare_for_inference(self, quantized: tuple[int, dict] | None = None,
                              head: dict | None = None) -> None:
        """Freeze the matmuls for inference (see ``frozen_linear``). On CPU the LM head becomes a
        oneDNN-packed copy too (``F.linear`` on the (vocab, hidden) layout streams at ~14 GB/s
        here, the packed one at ~45), at the cost of one more vocab x hidden matrix of memory.
        ``head``: the LM head a quantized checkpoint's recipe asks for (``quant_linear.head_from_recipe``:
        int8 with its top logits recomputed, or float16)."""
        w = self.lm_head.weight
        if head is not None and w.device.type == "cpu":  # (elsewhere the head stays in the model's dtype)
            self._head = head_from_recipe(w, head)
        else:
            self._head = FrozenLinear(w) if w.device.type == "cpu" else None
        from ..native_decode import wanted as native_wanted
        plain = w.device.type == "cpu" and native_wanted()
        for i, layer in enumerate(self.model.layers):  # everywhere: fewer, larger matmuls and launches
            qa = qm = None
            if quantized is not None:
                bits, t = quantized
                p = f"model.layers.{i}."
                qa = (bits, {k: t[f"{p}self_attn.{k}_proj.weight"] for k in "qkvo"})
                qm = (bits, {k: t[f"{p}mlp.{k}_proj.weight"] for k in ("gate", "up", "down")})
            layer.self_attn.fuse(qa, plain=plain)
            layer.mlp.fuse(qm, plain=plain)
        self._native = None
        if w.device.type == "cpu":  # decode steps of a few sequences in one native call a layer
            from ..native_decode import build as build_native
            self._native = build_native(self)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training and teacher scoring: (B, T) token ids -> (B, T, vocab) logits with plain causal
        attention and no KV cache, on the unfused modules (call it before ``prepare_for_inference``)."""
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.tables(torch.arange(t, device=input_ids.device), x.dtype)  # (T, 1, D)
        for layer in self.model.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, a.nh, a.hd)
            k = a.k_proj(h).view(b, t, a.nkv, a.hd)
            v = a.v_proj(h).view(b, t, a.nkv, a.hd)
            if a.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = a.rotary.rotate(q, rope), a.rotary.rotate(k, rope)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=a.scale,
                enable_gqa=a.nh != a.nkv)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, a.nh * a.hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_index):
        if meta.native is not None:
            return self._native.forward(input_ids, positions, kv_caches, *meta.native, meta.slot_mapping, logits_index)
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        for layer, cache in zip(self.model.layers, kv_caches):
            x = layer(x, rope, cache, meta)
        x = self.model.norm(x[logits_index])
        head = getattr(self, "_head", None)
        return (head(x) if head is not None else self.lm_head(x)).float()
