"""Paged attention over a block KV cache for ragged batches (prefill chunks and decode mixed).

The portable path: write the step's K/V into the cache by slot, gather each sequence's context
block by block through its block table, and run a padded ``scaled_dot_product_attention`` per *group*:

- the decode group: every sequence with one query this step. Its queries are rows of the step,
  one per sequence, so there is no query padding; a mask is needed unless every context fills its
  last block and all are as long.
- the prefill group: sequences with several queries (prefill chunks), padded to the longest.

The cache is head-major within a block, (2, blocks, Hkv, block_size, D) (``cache_shape``), so a
sequence's context for one head is whole (block_size, D) rows: the gather is one ``index_select`` on
dim 0 of a (blocks x Hkv, block_size x D) view for K and one for V (rows of kilobytes: 2-5x faster
than a row per slot or a gather along another dim), and lands as (S, Hkv, C, D), contiguous, which
SDPA reads 15-25% faster than the token-major strided view. It goes into one buffer that every
layer of the step reuses on CPU (``GatherSpace``: a fresh allocation of that size page-faults on
every layer, up to 6x slower at long contexts).

Keeping them apart matters: padded together, one 32-token prefill chunk in a step of 64 decoding
sequences makes every sequence attend with 32 query rows (measured: serving steps 2x slower).

The CUDA kernel path (decode-only steps): block tables and context lengths instead of gathers. On
CPU with the native kernels (``native/kernels.cpp``), decode groups do the same: ``decode_attention``
reads each context in place through its block table up to its length (no gather, mask or padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """S sequences of one kind. B = most blocks of a context, C = B x block_size; Q = longest query
    (prefill)."""

    kv_blocks: torch.Tensor             # (S, B) cache blocks of each context, in order (padding: 0)
    mask: torch.Tensor | None           # (S, 1, Q or 1, C) bool, True = attend; None: attend to all
    rows: torch.Tensor | None = None    # decode: (S,) the step row of each sequence's query; None: all T
    q_index: torch.Tensor | None = None  # prefill: (S, Q) step rows of each sequence's queries (pad: 0)
    q_valid: torch.Tensor | None = None  # prefill: (S, Q) bool
    out_rows: torch.Tensor | None = None  # prefill: step rows of q_index[q_valid]; None: all T in order
    head_rows: torch.Tensor | None = None  # (S x Hkv x B,) rows of the (blocks x Hkv, ...) view: made once a step
    context_lens: torch.Tensor | None = None  # decode on CPU with the native kernels: (S,) int64; the
    #                                          context is then read in place (no gather, no mask)

    @property
    def is_decode(self) -> bool:
        return self.q_index is None


@dataclass
class AttentionMetadata:
    """Per step. T = tokens in the step."""

    slot_mapping: torch.Tensor  # (T,) cache slot (block * block_size + offset) of each new token
    groups: list[AttentionGroup] = field(default_factory=list)
    # the kernel path (CUDA, decode only): read the cache through block tables, no gather
    block_tables: torch.Tensor | None = None  # (S, max_blocks) int32
    context_lens: torch.Tensor | None = None  # (S,) int32
    workspace: "GatherSpace | None" = None  # CPU: the buffer the layers gather their context into
    write_rows: torch.Tensor | None = None  # (T x Hkv,) rows of the (slots x Hkv, D) view: made once a step
    # the native decode path (CPU, one new token per sequence: ``native_decode``): (S, B) int64
    # cache blocks of each context and (S,) int64 context lengths; the layers attend in one call each
    native: tuple[torch.Tensor, torch.Tensor] | None = None


def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """One layer's KV cache: K and V, head-major within each block."""
    return (2, num_blocks, num_kv_heads, block_size, head_dim)


class GatherSpace:
    """One buffer for the step's context gathers, reused layer after layer and step after step
    (layers run one after the other, and each reads its gather before the next layer writes). It
    keeps the largest size asked for."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        b = self._buf
        if b is None or b.numel() < n or b.dtype != like.dtype or b.device != like.device:
            b = self._buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)


def _context(kv_cache: torch.Tensor, g: AttentionGroup,
             space: GatherSpace | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each sequence's context, (S, Hkv, C, D) each and contiguous: K and V each
    in one ``index_select`` of whole (block_size, D) rows of one head."""
    _, nb, hkv, bs, d = kv_cache.shape
    s, b = g.kv_blocks.shape
    if g.head_rows is None:
        heads = torch.arange(hkv, device=g.kv_blocks.device)
        g.head_rows = (g.kv_blocks[:, None, :] * hkv + heads[None, :, None]).reshape(-1)
    if space is None:
        ctx = torch.stack([kv_cache[i].view(nb * hkv, -1).index_select(0, g.head_rows) for i in range(2)])
    else:
        ctx = space.take((2, s * hkv * b, bs * d), kv_cache)
        for i in range(2):
            torch.index_select(kv_cache[i].view(nb * hkv, -1), 0, g.head_rows, out=ctx[i])
    ctx = ctx.view(2, s, hkv, b * bs, d)
    return ctx[0], ctx[1]


def _group_attention(q, kv_cache, g: AttentionGroup, scale: float, space: GatherSpace | None) -> torch.Tensor:
    hkv = kv_cache.shape[2]
    if g.context_lens is not None:  # the native kernel reads each context in place
        from .native import ops
        queries = (q if g.rows is None else q[g.rows]).contiguous()
        return ops().decode_attention(queries, kv_cache, g.kv_blocks, g.context_lens, scale)
    keys, values = _context(kv_cache, g, space)    # (S, Hkv, C, D)
    if g.is_decode:
        queries = (q if g.rows is None else q[g.rows]).unsqueeze(2)   # (S, Hq, 1, D)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask, scale=scale,
                                             enable_gqa=q.shape[1] != hkv)
        return out.squeeze(2)                      # (S, Hq, D)
    queries = q[g.q_index].transpose(1, 2)         # (S, Hq, Q, D)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask, scale=scale,
                                         enable_gqa=q.shape[1] != hkv)
    return out.transpose(1, 2)[g.q_valid]          # (sum of query lengths, Hq, D)


def paged_attention(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: (T, Hq, D); kv: (2, T, Hkv, D) the step's new keys and values, any strides (a view of the
    fused qkv output); kv_cache: ``cache_shape`` (2, num_blocks, Hkv, block_size, D). Returns (T, Hq, D)."""
    t, hkv, d = kv.shape[1], kv.shape[2], kv.shape[3]
    bs = kv_cache.shape[3]
    if meta.write_rows is None:  # slot (block, offset) of token t, head h -> row (block, h, offset)
        slots = meta.slot_mapping
        heads = torch.arange(hkv, device=slots.device)
        meta.write_rows = (((slots // bs) * hkv)[:, None] + heads[None, :]).mul_(bs).add_((slots % bs)[:, None]).reshape(-1)
    kvc = kv_cache.view(2, -1, d)
    kvc.index_copy_(1, meta.write_rows, kv.reshape(2, t * hkv, d))
    if meta.block_tables is not None:
        from .triton_attention import paged_decode_attention

        # the kernel takes (num_blocks, block_size, Hkv, D) with any strides: the head-major cache, viewed
        return paged_decode_attention(q, kv_cache[0].transpose(1, 2), kv_cache[1].transpose(1, 2),
                                      meta.block_tables, meta.context_lens, scale)
    if len(meta.groups) == 1:  # one kind of sequence: its output rows are the step's, in order
        return _group_attention(q, kv_cache, meta.groups[0], scale, meta.workspace)
    out = torch.empty_like(q)
    for g in meta.groups:
        out[g.rows if g.is_decode else g.out_rows] = _group_attention(q, kv_cache, g, scale, meta.workspace)
    return out
