"""Paged decode attention as a Triton kernel (the CUDA path): one query token per sequence reads
its context straight from the block KV cache through its block table, with no gather into a
padded copy, so the step's tensors have fixed shapes for a given batch size (what CUDA graphs need)
and only the blocks a sequence really uses are read.

One program per (sequence, KV head) handles that head's whole query group (grouped-query attention
reads each K/V block once for all the query heads that share it), walking the context one cache
block at a time with an online softmax (running max and sum, as FlashAttention does) in float32.
The same kernel runs on CPU under ``TRITON_INTERPRET=1``, which is how the tests check it without a
GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
                             stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_ts, stride_os, stride_oh,
                             GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                             DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM_P2)
        t = tl.arange(0, BLOCK_SIZE)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)        # (G, D)
        ctx = tl.load(lens_ptr + seq)
        m = tl.full((GROUP_P2,), float("-inf"), tl.float32)
        s = tl.zeros((GROUP_P2,), tl.float32)
        acc = tl.zeros((GROUP_P2, DIM_P2), tl.float32)
        for j in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
            block = tl.load(tables_ptr + seq * stride_ts + j).to(tl.int64)
            pos_ok = j * BLOCK_SIZE + t < ctx
            off = block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)            # (B, D)
            v = tl.load(v_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale              # (G, B)
            scores = tl.where(pos_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / s[:, None]
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q: (S, Hq, D); caches: (num_blocks, block_size, Hkv, D); block_tables: (S, max_blocks) int32;
    context_lens: (S,) int32, each >= 1 and counting the current token. Returns (S, Hq, D)."""
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton")
    num_seqs, hq, dim = q.shape
    _, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    _paged_decode_kernel[(num_seqs, hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=dim, DIM_P2=triton.next_power_of_2(dim),
        BLOCK_SIZE=block_size)
    return out
