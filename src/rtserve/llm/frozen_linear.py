"""CPU matmuls for the decoders: ``y = x @ W.T + b`` in whichever layout measures fastest on this
machine for this weight's shape, chosen once at load time:

- "onednn": the weight packed once by oneDNN (``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise``, the ops PyTorch's own CPU compiler uses for frozen linear layers);
- "mm": ``x @ W_t`` on a transposed contiguous copy (MKL's sgemm);
- "linear": ``F.linear`` on the weight as stored (no copy);
- "native": rtserve's own kernel (``native/kernels.cpp``) on the weight as stored: each weight row
  read once for all rows of x, no packing. Decoding one sequence is a stream of the weights, and
  this streams them fastest here (4.6 ms against oneDNN's 7.0 for the 34M Llama's 136 MB, AVX-512
  EPYC, 2 threads); it is also what the fused native decode layer (``native_decode``) reads.

Why measure: decode is a small-M matmul against every weight, and which kernel streams it best
depends on the CPU (AVX2 or AVX-512, cache sizes) and the shape. On this project's 2-core AVX-512
machine the packed layout wins at M >= 4 by 1.2-5x (the 32000 x 512 LM head most), while at M = 1
MKL's sgemm on the transposed copy is often as fast or faster. Each distinct (shape, dtype,
threads) is timed once at M = 1, 8 and 64 (runs interleaved, best of several): the layout with the
least summed relative loss at 8 and 64 serves several rows; one row gets its own layout only when
that is 25% faster at M = 1 (then the weight is held twice: ``measure``).

The oneDNN ops are private, so a weight is packed only after a check that the packed product
matches the plain one. ``RTSERVE_MATMUL`` = onednn | mm | linear | native forces a layout (where usable);
``RTSERVE_ONEDNN=0`` rules oneDNN out.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from .native import ops as native_ops

LAYOUTS = ("onednn", "mm", "linear", "native")
_CHOSEN: dict[tuple, str] = {}  # (out, in, dtype, threads, bias) -> layout, measured once per process


def _onednn_usable() -> bool:
    return (os.environ.get("RTSERVE_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _pack(weight: torch.Tensor, bias: torch.Tensor | None):
    """The oneDNN-packed weight, or None when the ops are missing, fail or disagree with ``x @ W.T``."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        want = x @ weight.t() + (bias if bias is not None else 0)
        scale = float(want.abs().max()) + 1e-6
        if got.shape != want.shape or float((got - want).abs().max()) > 1e-4 * scale:
            return None
        return packed
    except (RuntimeError, TypeError):
        return None


def _best_time(fn, x: torch.Tensor, rounds: int) -> list[float]:
    """Per candidate, the best of ``rounds`` timings; candidates interleaved so a noisy moment
    hits them alike."""
    best = [float("inf")] * len(fn)
    for f in fn:
        f(x)  # warm up (first-call allocations, oneDNN primitive creation)
    for _ in range(rounds):
        for i, f in enumerate(fn):
            t0 = time.perf_counter()
            f(x)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def measure(candidates: dict, in_features: int, rounds: int = 7) -> tuple[str, str]:
    """(layout for one row, layout for several rows). Several: the least summed relative slowdown at
    M = 16 and M = 64 (steps of up to ``native_decode``'s max_rows rows run the fused native step
    instead, so 8 rows would favour a layout that only wins where it is not used: on a
    2-core AVX2 EPYC it picked the native product, 1.8x slower than oneDNN at 16 rows). One row
    (decode of one sequence): the fastest at M = 1 when it beats the several-rows layout there by 25%
    or more (then the layer keeps both: memory for speed), else the same."""
    names, fns = list(candidates), list(candidates.values())
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        t = {m: _best_time(fns, torch.randn(m, in_features, generator=g), rounds) for m in (1, 16, 64)}
    loss = [t[16][i] / min(t[16]) + t[64][i] / min(t[64]) for i in range(len(names))]
    many = loss.index(min(loss))
    one = t[1].index(min(t[1]))
    return names[one if t[1][many] >= 1.25 * t[1][one] else many], names[many]


def _native_layout(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the native kernels read it best: in panels of 16 outputs (faster at every batch
    size measured: 1 row 0.6-1.0x the time of the (out, in) rows, 16-64 rows 0.45-0.65x, and
    0.9x oneDNN's), else (out, in) contiguous."""
    from .native import pack_panels

    p = pack_panels(weight)
    return p if p is not None else weight.contiguous()


class FrozenLinear:
    """A frozen linear layer for inference, on any device (on CPU in float32, in the layout measured
    fastest here). ``weight``: (out, in) as ``nn.Linear`` stores it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, plain: bool = False) -> None:
        """``plain``: keep the weight in the native kernels' layout as well, for the native decode layers
        (``native_weight``) whatever the layouts chosen (memory for speed)."""
        weight = weight.detach()
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.packed = self.weight_t = self.weight = self.native = None
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            self.layout = self.layout_one = "mm"  # the fastest plain layout off-CPU
            self.weight_t = weight.t().contiguous()
            return
        packed = _pack(weight, self.bias) if _onednn_usable() else None
        forced = os.environ.get("RTSERVE_MATMUL", "")
        if forced and forced not in LAYOUTS:
            raise ValueError(f"RTSERVE_MATMUL={forced!r}: expected one of {', '.join(LAYOUTS)}")
        key = (*weight.shape, weight.dtype, torch.get_num_threads(), bias is not None, packed is not None)
        usable = forced != "onednn" or packed is not None
        if forced == "native":
            usable = native_ops() is not None
        layout = (forced, forced) if forced and usable else _CHOSEN.get(key)
        wt = wn = None  # made for the measurement on a shape's first sight, then kept as they are
        if layout is None:
            wt = weight.t().contiguous()
            cands = {"mm": lambda x: self._mm(x, wt), "linear": lambda x: F.linear(x, weight, self.bias)}
            if native_ops() is not None:
                wn = _native_layout(weight)
                cands["native"] = lambda x: native_ops().linear(x, wn, None, self.bias)
            if packed is not None:
                cands["onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            layout = _CHOSEN[key] = measure(cands, weight.shape[1])
        self.layout, self.layout_one = layout[1], layout[0]
        self.packed = packed if "onednn" in layout else None
        self.weight_t = (wt if wt is not None else weight.t().contiguous()) if "mm" in layout else None
        keep = "native" in layout or (plain and native_ops() is not None)
        self.native = (wn if wn is not None else _native_layout(weight)) if keep else None
        self.weight = weight if "linear" in layout else None

    def _mm(self, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ wt
        return torch.addmm(self.bias, x, wt) if x.dim() == 2 else x @ wt + self.bias

    @property
    def native_weight(self) -> torch.Tensor | None:
        """The float32 weight the native kernels read (in panels, ``native.pack_panels``, where the
        outputs are a multiple of 16, else (out, in)); None when not kept."""
        return self.native

    @property
    def onednn(self) -> bool:
        return self.packed is not None

    def _call(self, layout: str, x: torch.Tensor) -> torch.Tensor:
        if layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if layout == "mm":
            return self._mm(x, self.weight_t)
        if layout == "native":
            return native_ops().linear(x.reshape(-1, x.shape[-1]).contiguous(), self.native, None,
                                       self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(self.layout_one if x.dim() == 2 and x.shape[0] == 1 else self.layout, x)
