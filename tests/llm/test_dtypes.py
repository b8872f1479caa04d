"""``dtype: auto`` and the warning for bfloat16 / float16 on a CPU without native support (llm/dtypes.py)."""
from __future__ import annotations

import logging

import pytest
import torch

from rtserve.llm.dtypes import cpu_has_native, resolve_dtype
from rtserve.llm.engine_config import EngineConfig

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}
SAPPHIRE = AVX512_BF16 | {"amx_bf16", "amx_tile", "avx512_fp16"}


def test_auto_is_the_default_and_float32_on_cpu():
    assert EngineConfig().dtype == "auto"
    assert resolve_dtype("auto", "cpu", flags=AVX2) is torch.float32
    assert resolve_dtype("auto", "cpu", flags=SAPPHIRE) is torch.float32


@pytest.mark.parametrize("bf16,want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bfloat16_where_supported(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", "cuda:0") is want


def test_native_support_from_the_cpu_flags():
    assert cpu_has_native(torch.bfloat16, AVX2) is False and cpu_has_native(torch.float16, AVX2) is False
    assert cpu_has_native(torch.bfloat16, AVX512_BF16) is True and cpu_has_native(torch.float16, AVX512_BF16) is False
    assert cpu_has_native(torch.float16, SAPPHIRE) is True
    assert cpu_has_native(torch.bfloat16, frozenset({"fp", "asimd", "bf16"})) is True  # Arm Features
    assert cpu_has_native(torch.float32, AVX2) is True


@pytest.mark.parametrize("name,flags,warns", [
    ("bfloat16", AVX2, True), ("float16", AVX512_BF16, True), ("bfloat16", AVX512_BF16, False),
    ("float16", SAPPHIRE, False), ("float32", AVX2, False), ("auto", AVX2, False)])
def test_low_precision_without_native_support_warns(caplog, name, flags, warns):
    with caplog.at_level(logging.WARNING, logger="rtserve.llm.dtypes"):
        dtype = resolve_dtype(name, "cpu", flags=flags)
    assert dtype is (torch.float32 if name == "auto" else getattr(torch, name))
    msgs = [r.getMessage() for r in caplog.records if r.name == "rtserve.llm.dtypes"]
    if warns:
        assert len(msgs) == 1 and f"engine.dtype {name} on a CPU without native" in msgs[0]
        assert "several times slower than float32" in msgs[0] and "dtype: auto or float32" in msgs[0]
    else:
        assert msgs == []


def test_bad_name_is_refused():
    with pytest.raises(ValueError, match="engine.dtype: 'float64' is not one of auto, float32"):
        resolve_dtype("float64", "cpu")


def test_engine_resolves_auto(tmp_path):
    pytest.importorskip("transformers")
    from models import write_random_llama
    from rtserve.llm.engine import LLM

    write_random_llama(tmp_path, intermediate_size=64, max_position_embeddings=64)
    llm = LLM(tmp_path, num_blocks=16, block_size=4)
    assert llm.engine_config.dtype == "auto" and llm.runner.dtype is torch.float32
    assert llm.runner.kv_caches[0].dtype is torch.float32
