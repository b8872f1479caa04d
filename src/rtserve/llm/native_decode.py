"""Decode steps of a few sequences on CPU through the native kernels: all decoder layers in one call
(``torch.ops.rtserve.decode_layers``, ``native/kernels.cpp``) instead of ~150 PyTorch operations each.

Decoding one sequence on a CPU streams every weight once per token; what is left beyond that is
per-operation overhead (dispatch, allocation, Python), about 40% of the step for the 34M Llama of
``benchmarks/llm_cpu.py``. The fused layer reads each weight as the checkpoint stores it (float32,
or int8 with per-row scales) and attends over the paged cache in place through the block table (no
gather, no mask, no padding).

Used for a step when: the device is the CPU; the step has at most ``max_rows`` tokens in all (each
token is a row with its sequence's block table and its own context length, its position + 1, so
decode steps, speculative verification of a few proposals and short prefill chunks all qualify:
the rows' keys and values are written before any row attends, and each attends causally); and
every layer's matmuls keep a weight the kernels read (``FrozenLinear.native_weight``: float32, kept
beside oneDNN's packed copy, memory for speed; ``QuantLinear.native_weights``: the int8 weight the
other kernels share). Otherwise the PyTorch path runs, unchanged. ``max_rows`` is the largest batch
for which the native matmul measured at load was no slower than the layout the layers use for
several rows (each weight row is read once for all rows, but the products are not blocked for cache
as oneDNN's are, so from some batch size on oneDNN wins).
``RTSERVE_NATIVE_DECODE=0`` turns the path off; ``RTSERVE_NATIVE_DECODE_ROWS=N`` sets ``max_rows``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .native import in_features
from .native import ops as native_ops

#: batch sizes tried above 1, in order, up to the first slower one
ROW_CANDIDATES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128)
#: the fused layers may use matmuls this much slower than the PyTorch path's: they save its other
#: operations (34M Llama, 2-core EPYC: c=4 decoded 4-16% faster fused with matmuls about even, c=8
#: 5-9% slower with them 17-24% slower)
FUSED_SLACK = 1.15


@dataclass
class NativeLayer:
    """One decoder layer's tensors as ``rtserve::decode_layer`` takes them."""
    ln1: torch.Tensor
    qkv: tuple                      # (weight, scales or None, bias or None)
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: tuple                        # (weight, scales or None)
    ln2: torch.Tensor
    gate_up: tuple
    down: tuple


def _weights(linear) -> tuple | None:
    """(weight, scales or None) the native kernels can read for one row, or None."""
    w = getattr(linear, "native_weight", None)
    if w is not None:
        return w, None
    nw = getattr(linear, "native_weights", None)
    return nw() if callable(nw) else None


def _norm(module) -> torch.Tensor | None:
    return None if module is None else module.weight.detach().float().contiguous()


class NativeDecoder:
    """The layers of a Llama-family model in native form (``build``), and the step's forward."""

    def __init__(self, model, layers: list[NativeLayer]) -> None:
        self.model, self.layers = model, layers
        c = model.config
        self.nh, self.nkv, self.eps = c.num_heads, c.num_kv_heads, c.rms_norm_eps
        self.scale = c.head_dim ** -0.5
        self.max_rows = 1
        body = model.model
        self.embedding = body.embed_tokens.weight.detach()
        rot = model.rotary  # cos and signed sin side by side: one lookup a step
        self.rope = torch.stack([rot.cos, rot.signed_sin], 1).contiguous()  # (positions, 2, D)
        self.norm = body.norm.weight.detach()
        head = getattr(model, "_head", None)
        self.head = head if head is not None else model.lm_head
        # the head's weight when one row of it runs on the native kernel (then decode_logits runs the
        # whole step): a FrozenLinear whose one-row layout is "native", or a HalfHead's float16 copy
        self.head_weight, self.head_args = None, ()
        if getattr(head, "layout_one", None) == "native":
            self.head_weight = head.native_weight
        elif getattr(head, "native_rows", 0) >= 1:  # HalfHead / Int8Head (scales, rows to rescore)
            self.head_weight = head.weight
            self.head_args = (head.scale, head.half if head.exact_top_k else None, head.exact_top_k or 1)
        # decode_layers' argument: 13 entries a layer, flattened once (one call per step for all layers)
        self.flat = [t for la in layers for t in (la.ln1, *la.qkv, la.q_norm, la.k_norm, *la.o, la.ln2, *la.gate_up,
                                                  *la.down)]

    def forward(self, ids, positions, kv_caches, blocks, context_lens, slots, logits_index) -> torch.Tensor:
        """Logits of the rows ``logits_index`` for a decode-only step. blocks: (M, B) int64;
        context_lens, slots: (M,) int64."""
        x = self.embedding.index_select(0, ids)
        rope = self.rope.index_select(0, positions)  # (M, 2, D)
        if self.head_weight is not None and logits_index.shape[0] == 1:  # one call, embeddings to logits
            return native_ops().decode_logits(x, self.flat, kv_caches, rope, blocks, context_lens, slots, self.nh,
                                              self.nkv, self.eps, self.scale, logits_index, self.norm, self.head_weight,
                                              *self.head_args)
        x = native_ops().decode_layers(x, self.flat, kv_caches, rope, blocks, context_lens, slots, self.nh, self.nkv,
                                       self.eps, self.scale)
        x = x.index_select(0, logits_index)  # in logits_index's order (sampled rows, then prompt spans)
        x = torch.rms_norm(x, self.norm.shape, self.norm, self.eps)
        return self.head(x).float()

    def measure_rows(self) -> int:
        """``native_rows`` over every layer's matmuls in turn (the weights of a whole model are larger
        than the caches, as in a real step: timing one cache-resident weight favours oneDNN's blocked
        products), native against the layouts the layers use; ``RTSERVE_NATIVE_DECODE_ROWS`` overrides."""
        forced = os.environ.get("RTSERVE_NATIVE_DECODE_ROWS")
        if forced:
            return max(1, int(forced))
        pairs = []  # (native weights, the layer's own callable)
        for la, layer in zip(self.layers, self.model.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            pairs += [(la.qkv[:2], a.qkv), (la.o, a.o), (la.gate_up, mlp.gate_up), (la.down, mlp.down)]
        nat = native_ops()

        def native(x):
            for (w, s), _ in pairs:
                nat.linear(x[:, :in_features(w)].contiguous(), w, s, None)

        def theirs(x):
            for (w, _), own in pairs:
                own(x[:, :in_features(w)].contiguous())
        width = max(in_features(w) for (w, _), _ in pairs)
        return native_rows(native, theirs, width, slack=FUSED_SLACK)


def native_rows(native, other, in_features: int, rounds: int = 5, slack: float = 1.0) -> int:
    """The largest batch in ``ROW_CANDIDATES`` (else 1), in order up to the first failure, at which
    ``native(x)`` takes at most ``slack`` times ``other(x)``, timed interleaved, best of ``rounds``
    (each weight row is read once for all rows, but the products are not blocked for cache as
    oneDNN's are: from some batch size on oneDNN wins)."""
    best = 1
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in ROW_CANDIDATES:
            x = torch.randn(rows, in_features, generator=g)
            t = [float("inf"), float("inf")]
            for f in (native, other):
                f(x)
            for _ in range(rounds):
                for i, f in enumerate((native, other)):
                    t0 = time.perf_counter()
                    f(x)
                    t[i] = min(t[i], time.perf_counter() - t0)
            if t[0] > slack * t[1]:
                break
            best = rows
    return best


def wanted() -> bool:
    """The native decode path is on (``RTSERVE_NATIVE_DECODE`` is not 0) and the kernels are here."""
    return os.environ.get("RTSERVE_NATIVE_DECODE", "1") != "0" and native_ops() is not None


def build(model) -> NativeDecoder | None:
    """The native decoder for a prepared (fused) Llama-family model on CPU, or None when the kernels
    are unavailable, turned off, or some layer's matmul does not run natively for one row."""
    if not wanted():
        return None
    if model.lm_head.weight.device.type != "cpu" or model.lm_head.weight.dtype != torch.float32:
        return None
    layers = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        if getattr(a, "q_proj", 0) is not None or getattr(mlp, "gate_proj", 0) is not None:
            return None  # not fused
        qkv, o, gu, down = (_weights(lin) for lin in (a.qkv, a.o, mlp.gate_up, mlp.down))
        if qkv is None or o is None or gu is None or down is None:
            return None
        bias = getattr(a.qkv, "bias", None)
        layers.append(NativeLayer(
            ln1=_norm(layer.input_layernorm), qkv=(*qkv, bias), q_norm=_norm(getattr(a, "q_norm", None)),
            k_norm=_norm(getattr(a, "k_norm", None)), o=o, ln2=_norm(layer.post_attention_layernorm),
            gate_up=gu, down=down))
    dec = NativeDecoder(model, layers)
    dec.max_rows = dec.measure_rows()
    return dec
