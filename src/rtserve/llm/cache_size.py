"""How many KV-cache blocks an engine gets: a count from config, or a memory fraction.

On CUDA the fraction is of the device's total memory for the whole engine (as vLLM's
``gpu_memory_utilization``): what is left after the weights already loaded and a reserve for the
largest step's activations becomes KV cache. On CPU it is a fraction of the memory the system
reports available, since weights already sit there. Either way the count is capped at what
``max_num_seqs`` sequences of ``max_model_len`` tokens could ever use, plus an equal share for the
prefix cache, so a small model does not reserve gigabytes it cannot fill.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DecoderConfig

CPU_DEFAULT_FRACTION = 0.10
CUDA_DEFAULT_FRACTION = 0.90


@dataclass(frozen=True)
class CacheBudget:
    num_blocks: int
    block_bytes: int
    budget_bytes: int
    source: str  # "config" | "fraction"


def block_bytes(c: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V for ``block_size`` tokens in every layer."""
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()


def activation_reserve(c: DecoderConfig, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                       dtype: torch.dtype) -> int:
    """A generous bound on one step's transient memory: the hidden, qkv and MLP activations of the
    step's tokens, float32 logits of the sampled rows, and the gathered context of the attention."""
    e = torch.empty((), dtype=dtype).element_size()
    per_token = (4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * c.intermediate_size) * e
    logits = max_num_seqs * c.vocab_size * 4 * 3  # logits, softmax and sampler copies
    context = 2 * min(max_num_batched_tokens, max_num_seqs * max_model_len) * c.num_kv_heads * c.head_dim * e
    return 2 * (max_num_batched_tokens * per_token + logits + context)


def available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_cache(c: DecoderConfig, *, block_size: int, dtype: torch.dtype, device: torch.device,
               num_blocks: int | None, memory_fraction: float | None, max_num_seqs: int,
               max_num_batched_tokens: int, max_model_len: int) -> CacheBudget:
    per_block = block_bytes(c, block_size, dtype)
    if num_blocks is not None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        return CacheBudget(num_blocks, per_block, num_blocks * per_block, "config")
    if device.type == "cuda":
        fraction = CUDA_DEFAULT_FRACTION if memory_fraction is None else memory_fraction
    else:
        fraction = CPU_DEFAULT_FRACTION if memory_fraction is None else memory_fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")
    reserve = activation_reserve(c, max_num_batched_tokens, max_num_seqs, max_model_len, dtype)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total * fraction) - torch.cuda.memory_allocated(device) - reserve
    else:
        budget = int(available_cpu_bytes() * fraction) - reserve
    blocks_per_seq = -(-max_model_len // block_size)
    cap = 2 * max_num_seqs * blocks_per_seq
    blocks = min(budget // per_block, cap)
    if blocks < blocks_per_seq:
        raise ValueError(
            f"KV cache: {max(budget, 0) / 2**20:.0f} MiB left for the cache ({fraction:.2f} of "
            f"{'device' if device.type == 'cuda' else 'available'} memory, less weights and a "
            f"{reserve / 2**20:.0f} MiB activation reserve) holds {max(blocks, 0)} blocks of {block_size} tokens, "
            f"fewer than one sequence of max_model_len {max_model_len} needs ({blocks_per_seq}); "
            "raise kv_cache_memory_fraction or lower max_model_len")
    return CacheBudget(int(blocks), per_block, int(blocks) * per_block, "fraction")
