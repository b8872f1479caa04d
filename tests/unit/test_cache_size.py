"""KV-cache sizing from a block count or a memory fraction."""
from __future__ import annotations

import pytest
import torch

from rtserve.llm import cache_size
from rtserve.llm.cache_size import block_bytes, plan_cache
from rtserve.llm.config import DecoderConfig

CFG = DecoderConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=1000, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=256)
LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256)


def test_block_bytes_counts_k_and_v_in_every_layer():
    # 2 (K,V) x 2 layers x 16 tokens x 2 heads x 16 dims x 4 bytes
    assert block_bytes(CFG, 16, torch.float32) == 2 * 2 * 16 * 2 * 16 * 4
    assert block_bytes(CFG, 16, torch.bfloat16) == block_bytes(CFG, 16, torch.float32) // 2


def test_explicit_count_wins():
    b = plan_cache(CFG, block_size=16, dtype=torch.float32, device=torch.device("cpu"), num_blocks=7,
                   memory_fraction=0.5, **LIMITS)
    assert (b.num_blocks, b.source) == (7, "config")


def test_fraction_is_capped_by_what_the_limits_can_use(monkeypatch):
    monkeypatch.setattr(cache_size, "available_cpu_bytes", lambda: 64 * 2**30)
    b = plan_cache(CFG, block_size=16, dtype=torch.float32, device=torch.device("cpu"), num_blocks=None,
                   memory_fraction=None, **LIMITS)
    assert b.source == "fraction" and b.num_blocks == 2 * 4 * (256 // 16)


def test_fraction_follows_memory_and_too_little_is_a_clear_error(monkeypatch):
    per_block = block_bytes(CFG, 16, torch.float32)
    reserve = cache_size.activation_reserve(CFG, 128, 4, 256, torch.float32)
    monkeypatch.setattr(cache_size, "available_cpu_bytes", lambda: 10 * (reserve + 20 * per_block))
    b = plan_cache(CFG, block_size=16, dtype=torch.float32, device=torch.device("cpu"), num_blocks=None,
                   memory_fraction=0.1, **LIMITS)
    assert b.num_blocks == 20
    monkeypatch.setattr(cache_size, "available_cpu_bytes", lambda: 10 * (reserve + 3 * per_block))
    with pytest.raises(ValueError, match="fewer than one sequence of max_model_len 256"):
        plan_cache(CFG, block_size=16, dtype=torch.float32, device=torch.device("cpu"), num_blocks=None,
                   memory_fraction=0.1, **LIMITS)
    with pytest.raises(ValueError, match="kv_cache_memory_fraction must be in"):
        plan_cache(CFG, block_size=16, dtype=torch.float32, device=torch.device("cpu"), num_blocks=None,
                   memory_fraction=1.5, **LIMITS)
