"""EngineConfig: model.yaml's ``engine:`` keys, their defaults and their validation (no torch)."""
from __future__ import annotations

import pytest

from rtserve.llm.engine_config import EngineConfig


def test_keys_and_defaults():
    assert EngineConfig.keys() == (
        "num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "dtype",
        "enable_prefix_caching", "kv_cache_memory_fraction", "decode_kernel", "cuda_graphs", "pipeline_stages",
        "pipeline_micro_batches", "max_waiting", "max_waiting_tokens", "speculative", "engine_core")
    c = EngineConfig()
    assert (c.num_blocks, c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == \
        (None, 16, 64, 2048, None)
    assert (c.dtype, c.enable_prefix_caching, c.kv_cache_memory_fraction) == ("auto", True, None)
    assert (c.decode_kernel, c.cuda_graphs, c.pipeline_stages, c.pipeline_micro_batches) == (None, None, None, None)
    assert (c.engine_core, c.served_core) == ("auto", "process")


def test_admission_limits_default_to_multiples_of_the_batch_limits():
    c = EngineConfig()
    assert (c.max_waiting, c.max_waiting_tokens) == (None, None)
    assert (c.waiting_limit, c.waiting_tokens_limit) == (4 * 64, 8 * 2048)
    small = EngineConfig.from_dict({"max_num_seqs": 2, "max_num_batched_tokens": 100})
    assert (small.waiting_limit, small.waiting_tokens_limit) == (8, 800)  # follow the batch limits
    set_ = EngineConfig.from_dict({"max_waiting": 3, "max_waiting_tokens": 50})
    assert (set_.waiting_limit, set_.waiting_tokens_limit) == (3, 50)


def test_from_dict_keeps_defaults_and_takes_values():
    c = EngineConfig.from_dict({"num_blocks": 32, "block_size": 4, "kv_cache_memory_fraction": 1,
                                "decode_kernel": "gather", "cuda_graphs": False})
    assert c == EngineConfig(num_blocks=32, block_size=4, kv_cache_memory_fraction=1, decode_kernel="gather",
                             cuda_graphs=False)
    assert EngineConfig.from_dict({}) == EngineConfig()


def test_unknown_key_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError) as e:
        EngineConfig.from_dict({"num_block": 8})
    assert str(e.value) == f"engine: unknown key 'num_block'; allowed: {', '.join(sorted(EngineConfig.keys()))}"


@pytest.mark.parametrize("raw, message", [
    ({"num_blocks": 0}, "engine.num_blocks: must be an integer >= 1 or unset, got 0"),
    ({"block_size": "16"}, "engine.block_size: must be an integer >= 1, got '16'"),
    ({"max_num_seqs": True}, "engine.max_num_seqs: must be an integer >= 1"),
    ({"max_num_batched_tokens": 1.5}, "engine.max_num_batched_tokens: must be an integer >= 1"),
    ({"max_model_len": -1}, "engine.max_model_len: must be an integer >= 1 or unset"),
    ({"pipeline_stages": 0}, "engine.pipeline_stages: must be an integer >= 1 or unset"),
    ({"pipeline_micro_batches": 0}, "engine.pipeline_micro_batches: must be an integer >= 1 or unset"),
    ({"max_waiting": -1}, "engine.max_waiting: must be an integer >= 0 or unset, got -1"),
    ({"max_waiting_tokens": "lots"}, "engine.max_waiting_tokens: must be an integer >= 1 or unset, got 'lots'"),
    ({"dtype": "float64"}, "engine.dtype: 'float64' is not one of auto, float32, bfloat16, float16"),
    ({"decode_kernel": "flash"}, "engine.decode_kernel: 'flash' is not one of gather, triton (or unset)"),
    ({"enable_prefix_caching": "yes"}, "engine.enable_prefix_caching: must be true or false, got 'yes'"),
    ({"cuda_graphs": 1}, "engine.cuda_graphs: must be true or false or unset, got 1"),
    ({"kv_cache_memory_fraction": 0}, "engine.kv_cache_memory_fraction: must be a number in (0, 1] or unset"),
    ({"kv_cache_memory_fraction": 1.5}, "engine.kv_cache_memory_fraction: must be a number in (0, 1]"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    with pytest.raises(ValueError) as e:
        EngineConfig.from_dict(raw)
    assert str(e.value).startswith(message)


def test_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().num_blocks = 3  # type: ignore[misc]
