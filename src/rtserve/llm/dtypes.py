"""The engine's ``dtype`` names (``engine_config.DTYPES``) to torch dtypes, resolved in this one place.

``auto`` (the default) is float32 on a CPU and bfloat16 on a GPU that supports it (float16 on one
that does not). On a CPU, bfloat16 and float16 are fast only with native instructions (x86:
AVX512-BF16 or AMX for bfloat16, AVX512-FP16 or AMX-FP16 for float16; Arm: the BF16 and FP16
extensions); without them oneDNN and ATen convert every element on the way through, and the issue
measured bfloat16 at 1/6 of float32's speed on an AVX2 machine (13 against 77 tok/s at batch 1).
Asking for one there gets a warning that names the missing flag, not a refusal: memory may matter
more than speed.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: /proc/cpuinfo flags (x86 ``flags``, Arm ``Features``) that mean native arithmetic in that dtype
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
                torch.float16: ("avx512_fp16", "amx_fp16", "fphp", "asimdhp")}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags from /proc/cpuinfo; None where they cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_has_native(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool | None:
    """Whether this CPU computes in ``dtype`` natively (float32: always); None when unknown."""
    if dtype == torch.float32:
        return True
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return any(f in flags for f in NATIVE_FLAGS[dtype])


def resolve_dtype(name: str, device: torch.device | str, flags: frozenset[str] | None = None) -> torch.dtype:
    """The torch dtype for an engine ``dtype`` name on ``device``; logs a warning for bfloat16 or
    float16 on a CPU without native support. ``flags``: the CPU's (default: this machine's)."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in TORCH:
        raise ValueError(f"engine.dtype: '{name}' is not one of auto, {', '.join(TORCH)}")
    dtype = TORCH[name]
    if device.type == "cpu" and cpu_has_native(dtype, flags) is False:
        log.warning("engine.dtype %s on a CPU without native %s arithmetic (no %s flag; capability %s): "
                    "expect it several times slower than float32; dtype: auto or float32 is faster here",
                    name, name, " / ".join(NATIVE_FLAGS[dtype]), torch.backends.cpu.get_cpu_capability())
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
