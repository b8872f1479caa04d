"""CPU kernels for the weight-only quantized layers (``quant_linear.QuantLinear``): products with the
int8 / int4 weight that never build the float weight, chosen per weight shape by timing them at load.

Every kernel here keeps the activations at about float32 precision, so a quantized model agrees with
its dequantized float reference as closely as the dequantizing matmul does (the only error is the
weights' own). Kernels that quantize the activations were measured and left out for that reason:
PyTorch's ``quantized::linear_dynamic`` (fbgemm, one int8 scale per batch) is 2-10x faster than
float32 at every batch size but drops the demo LM's top-1 agreement from 98.9% to 95.6% (91.5% with
``reduce_range``), and per-token int8 activations drop it to 97.9%.

- ``int8pack-bf16x2`` (int8): ``torch._weight_int8pack_mm``, PyTorch's weight-only int8 kernel. Its
  float32 path is scalar (10-100x slower than oneDNN); its bfloat16 path is vectorized on AVX2 and
  AVX-512 alike. A float32 row is split into two bfloat16 rows, ``hi = bf16(x)`` and
  ``lo = bf16(x - hi)`` (16 of float32's 24 mantissa bits), run as one matrix of 2M rows, and the
  per-channel scale is applied in float32 afterwards (a bfloat16 scale would be off by up to 0.4%).
  Batch-1 decode streams 1 byte a weight instead of 4: fastest for small batches.
- ``intmm-x2`` (int8): ``torch._int_mm`` (int8 x int8 -> int32, oneDNN). Each row becomes two int8
  rows, its per-row quantization and the quantized residual (~15 bits together); the int32 products
  are exact and scaled in float32. Faster than float32 from about 16 rows up where VNNI is present;
  without it 10-20x slower. Above one row, timing chooses between it and ``native-int8`` (``EXACT``).
- ``int4pack-bf16x2`` (int4): ``aten._weight_int4pack_mm_for_cpu`` (the tinygemm int4 layout for
  CPU), rows split as above; group scales in bfloat16, the kernel's own format.
- ``native-int8`` (int8): rtserve's own kernel (``native/kernels.cpp``): the int8 weight in panels of
  16 outputs (a copy of its own, ``native.pack_int8``), read once for all rows of x, widened to
  float32 in registers against float32 activations (exact up to float32 rounding). On AVX-512 VNNI
  builds by default (opt-in on AVX2, ``RTSERVE_INT8_PAIRS=1``): panels of k pairs against x in int16
  with a scale each 128 values, one vpdpwssd for 32 products (AVX2: a vpmaddwd for 16, faster for
  1-2 rows only), ~3e-5 of the chunk's largest value off, as intmm-x2. A stream
  of 1 byte a weight: the fastest for one row where it builds (timing decides);
  the fused native decode layer (``native_decode``) reads the same weight.
- ``native-int4`` (int4): rtserve's own int4 kernel: the weight as two nibbles a byte in panels of 16
  outputs with float32 group scales (``native.pack_int4``), widened to float32 in registers against
  float32 activations (exact up to float32 rounding, as ``native-int8``); batches of more than eight
  rows widen each panel once a call and run the float32 panel product. AVX-512 VNNI builds (group
  sizes that nest with 128) multiply int16 pairs with x in int16 instead, as the int8 pairs (~3e-5 of
  a chunk's largest value off): up to eight rows from the nibbles in registers, more from panels
  widened once a call. The fused native decode layer
  reads the same weight.
- ``dequant``: expand the weight to float per call: the fallback when the others fail their check.

``RTSERVE_QUANT_KERNEL=<name>`` forces one kernel (benchmarks, tests).
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Kernel = Callable[[torch.Tensor], torch.Tensor]
BUCKETS = (1, 16, 64)  # rows timed at load; a call uses the choice of the nearest (in log scale)
#: above one row, int8 layers choose by timing among these kernels only: their products equal the
#: dequantizing matmul's up to float32 rounding (native-int8) or a ~15-bit split of the activations
#: (intmm-x2), so prompt scoring and prefill keep the dequantizing matmul's fidelity (timed choices
#: that mixed in int8pack per shape: demo LM 98.66-98.84% top-1 against 98.9%). intmm-x2 is the
#: faster from ~16 rows up with VNNI; without it (AVX2) PyTorch's int8 matmul is 10-20x slower than
#: float32 (2-core EPYC, AVX2: 44 ms against native-int8's ~2 ms for 64 rows of a 2816 x 512 weight)
EXACT = ("native-int8", "intmm-x2", "native-int4")
_CHOICES: dict[tuple, dict[int, str]] = {}  # (bits, out, in, group) -> {bucket rows: kernel name}
_LOCK = threading.Lock()


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 -> (2M, K) bfloat16: ``hi`` rows then ``lo`` rows, ``hi + lo`` ~= x."""
    hi = x.to(torch.bfloat16)
    return torch.cat([hi, (x - hi).to(torch.bfloat16)])


@functools.lru_cache(maxsize=64)
def _ones_bf16(n: int) -> torch.Tensor:
    """Unit scales, shared by every layer with ``n`` outputs (the real ones are applied in float32)."""
    return torch.ones(n, dtype=torch.bfloat16)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 64-byte boundary: safetensors hands out tensors at any offset of the file
    (24 bytes past one here), and ``_weight_int8pack_mm``'s AVX-512 path crashes on such a weight."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _int8pack(q: torch.Tensor, scales: torch.Tensor) -> Kernel:
    ones = _ones_bf16(q.shape[0])
    s = scales.float()

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # a bfloat16 model: one row each, the scale in the kernel
            return torch._weight_int8pack_mm(x, q, ones).mul_(s.to(x.dtype))
        m = x.shape[0]
        y = torch._weight_int8pack_mm(split_bf16(x), q, ones).float()  # (2M, N)
        return (y[:m] + y[m:]).mul_(s).to(x.dtype)
    run.nbytes = q.numel() + 4 * q.shape[0]  # int8 weight, float32 scales
    return run


def _intmm(q: torch.Tensor, scales: torch.Tensor) -> Kernel:
    qt = q.t()  # (K, N) view: no copy
    s = scales.float()

    def run(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        s1 = xf.abs().amax(1, keepdim=True).clamp_(min=1e-30).div_(127.0)  # (M, 1)
        q1 = torch.round(xf / s1)
        s2 = s1 / 254.0  # the residual lies within +-s1/2
        q2 = torch.round((xf - q1 * s1) / s2)
        m = x.shape[0]
        y = torch._int_mm(torch.cat([q1, q2]).to(torch.int8), qt).float()  # (2M, N) exact int32 sums
        return (y[:m].mul_(s1).add_(y[m:].mul_(s2))).mul_(s).to(x.dtype)
    run.nbytes = q.numel() + 4 * q.shape[0]
    return run


def _int4pack(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> Kernel:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 2)
    # the kernel dequantizes w = (u - 8) * scale + zero; with u = q + 8 a zero of 0 gives q * scale
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).to(torch.bfloat16).contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
        m = x.shape[0]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(split_bf16(x), packed, group_size, sz).float()
        return (y[:m] + y[m:]).to(x.dtype)
    run.nbytes = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    return run


def _native(w: torch.Tensor, s: torch.Tensor, nbytes: int) -> Kernel:
    """The native kernel on a weight in one of its layouts, with its scales; ``native`` is what the
    fused decode layer reads."""
    from .native import ops

    nat = ops()

    def run(x: torch.Tensor) -> torch.Tensor:
        return nat.linear(x.float().contiguous(), w, s, None).to(x.dtype)
    run.nbytes = nbytes
    run.native = (w, s)
    return run


def _native_int8(q: torch.Tensor, scales: torch.Tensor) -> Kernel | None:
    from .native import ops, pack_int8

    if ops() is None:
        return None
    w = pack_int8(q)  # in panels (of k pairs on AVX2) where it can: faster at every batch size
    return _native(w, scales.float().contiguous(), q.numel() + 4 * q.shape[0])


def _native_int4(q: torch.Tensor, scales: torch.Tensor) -> Kernel | None:
    from .native import ops, pack_int4

    packed = pack_int4(q, scales) if ops() is not None else None
    if packed is None:
        return None
    w, s = packed
    return _native(w, s, w.numel() + 4 * s.numel())


def _dequant(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> Kernel:
    from .quant_linear import dequantize

    def run(x: torch.Tensor) -> torch.Tensor:
        return x @ dequantize(q, scales, x.dtype).t()
    run.nbytes = q.numel() + 4 * scales.numel()
    return run


def candidates(bits: int) -> tuple[str, ...]:
    # in order of preference where timings are close: native-int8 reproduces the dequantizing matmul
    # up to float32 rounding, then intmm-x2 (demo LM: the same mean KL to float32, 0.000146, against
    # int8pack's 0.000172)
    if bits == 8:
        return ("native-int8", "intmm-x2", "int8pack-bf16x2", "dequant")
    return ("native-int4", "int4pack-bf16x2", "dequant")


def build(name: str, q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> Kernel | None:
    """The kernel ``name`` for an (out, in) int8 ``q`` (int4 values in [-8, 7] for bits 4), or None
    when it is missing here or does not reproduce the dequantizing matmul on a random input."""
    q, scales = aligned(q), aligned(scales)
    try:
        if name == "int8pack-bf16x2" and bits == 8:
            fn = _int8pack(q, scales)
        elif name == "native-int8" and bits == 8 and scales.dim() == 1:
            fn = _native_int8(q, scales)
            if fn is None:
                return None
        elif name == "intmm-x2" and bits == 8:
            fn = _intmm(q, scales)
        elif name == "native-int4" and bits == 4 and scales.dim() == 2:
            fn = _native_int4(q, scales)
            if fn is None:
                return None
        elif name == "int4pack-bf16x2" and bits == 4:
            fn = _int4pack(q, scales, group_size)
        elif name == "dequant":
            return _dequant(q, scales, group_size)
        else:
            return None
        return fn if _agrees(fn, q, scales) else None
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return None


def _agrees(fn: Kernel, q: torch.Tensor, scales: torch.Tensor) -> bool:
    from .quant_linear import dequantize

    x = torch.randn(5, q.shape[1], generator=torch.Generator().manual_seed(0))
    want = x @ dequantize(q, scales).t()
    got = fn(x)
    # bfloat16 outputs carry 8 mantissa bits: 2^-8 of the largest output bounds their rounding
    return got.shape == want.shape and float((got - want).abs().max()) <= 2 ** -7 * float(want.abs().max()) + 1e-6


def _fastest(kernels: dict[str, Kernel], x: torch.Tensor, reps: int = 5) -> str:
    """The kernel with the lowest of ``reps`` timings, taken in turns (other processes share the
    cores: a burst of theirs then lands on every candidate alike, not on one); the first listed
    wins unless another is 10% faster, so noise does not flip the choice between near-equals."""
    best = dict.fromkeys(kernels, float("inf"))
    for fn in kernels.values():
        fn(x)  # first calls build oneDNN primitives
    for _ in range(reps):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn(x)
            best[name] = min(best[name], time.perf_counter() - t0)
    first = next(iter(best))  # the preferred one, unless another is clearly (10%) faster
    fastest = min(best, key=best.get)
    return fastest if best[fastest] < 0.9 * best[first] else first


@dataclass(frozen=True)
class Choice:
    """The kernel a call of a given number of rows uses: the one timed fastest at the nearest bucket."""
    kernels: dict[int, Kernel]  # bucket rows -> kernel
    names: dict[int, str]       # bucket rows -> kernel name
    native: tuple | None = None  # (int8 / int4 weight, float32 scales) the native decode layer reads, where it builds

    @property
    def nbytes(self) -> int:
        """Bytes the kernels hold (the int8 ones share one weight)."""
        return max(k.nbytes for k in self.kernels.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        return self.kernels[min(BUCKETS, key=lambda b: abs(math.log(b) - math.log(max(rows, 1))))](x)


def choose(q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> Choice:
    """The fastest working kernel at each of ``BUCKETS`` rows for this weight, timed once per weight
    shape in this process (later layers of the same shape reuse the choice)."""
    q, scales = aligned(q), aligned(scales)  # once, so the int8 kernels share one copy
    forced = os.environ.get("RTSERVE_QUANT_KERNEL")
    names = (forced,) if forced else candidates(bits)
    built = {n: k for n in names if (k := build(n, q, scales, bits, group_size)) is not None}
    if not built:
        if forced:
            raise ValueError(f"RTSERVE_QUANT_KERNEL={forced}: not available for int{bits} weights here")
        built = {"dequant": _dequant(q, scales, group_size)}
    fast = [n for n in built if n != "dequant"] or ["dequant"]  # dequant only as the last resort
    key = (bits, *q.shape, group_size, tuple(fast))
    with _LOCK:
        picks = _CHOICES.get(key)
    if picks is None:
        picks = {}
        for rows in BUCKETS:
            x = torch.randn(rows, q.shape[1])
            exact = [n for n in fast if n in EXACT]
            pool = exact if rows > 1 and exact else fast  # prefill and batches: the dequantizing matmul's numerics
            picks[rows] = _fastest({n: built[n] for n in pool}, x) if len(pool) > 1 else pool[0]
        with _LOCK:
            _CHOICES[key] = picks
    nat = built.get("native-int8") or built.get("native-int4")
    return Choice({r: built[n] for r, n in picks.items()}, dict(picks), nat.native if nat is not None else None)
