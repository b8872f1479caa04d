"""Paged attention over a block KV cache for ragged batches (prefill chunks and decode mixed).

The portable path: write the step's K/V into the cache by slot, gather each sequence's context
through its block table, and run one padded ``scaled_dot_product_attention`` for the batch.
A step where every sequence decodes one token skips the query gather and scatter: the step's
queries already are the batch, one row per sequence, and the mask is needed only when the
contexts differ in length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per step. T = tokens in the step, S = sequences, Q = longest query, C = longest context."""

    slot_mapping: torch.Tensor   # (T,) cache slot (block * block_size + offset) of each new token
    q_index: torch.Tensor | None  # (S, Q) index into T of each sequence's queries (padding: 0)
    q_valid: torch.Tensor | None  # (S, Q) bool
    kv_slots: torch.Tensor       # (S, C) cache slot of each context position (padding: 0)
    mask: torch.Tensor | None    # (S, 1, Q, C) bool, True = attend (causal within the context); None: all
    decode_only: bool = False    # every sequence has exactly one query (T == S, Q == 1)
    # the kernel path (CUDA, decode only): read the cache through block tables, no gather
    block_tables: torch.Tensor | None = None  # (S, max_blocks) int32
    context_lens: torch.Tensor | None = None  # (S,) int32


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (T, Hq, D); k, v: (T, Hkv, D); caches: (num_blocks, block_size, Hkv, D). Returns (T, Hq, D)."""
    hkv, d = k.shape[1], k.shape[2]
    kc, vc = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    kc.index_copy_(0, meta.slot_mapping, k)
    vc.index_copy_(0, meta.slot_mapping, v)
    if meta.block_tables is not None:
        from .triton_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    keys = kc[meta.kv_slots].transpose(1, 2)      # (S, Hkv, C, D)
    values = vc[meta.kv_slots].transpose(1, 2)
    if meta.decode_only:
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=meta.mask, scale=scale,
                                             enable_gqa=q.shape[1] != hkv)
        return out.squeeze(2)                     # (S, Hq, D) == (T, Hq, D)
    queries = q[meta.q_index].transpose(1, 2)     # (S, Hq, Q, D)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=q.shape[1] != hkv)
    return out.transpose(1, 2)[meta.q_valid]      # (T, Hq, D), in step order
