"""CPU matmuls for the decoders: ``y = x @ W.T + b`` through oneDNN with the weight packed once at
load time (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the ops PyTorch's
own CPU compiler uses for frozen linear layers).

Why: decode is a small-M matmul against every weight, and MKL's sgemm on a plain row-major weight
streams it poorly. Measured on this project's 2-core machine (float32, the 34M model's 25 weight
matrices, 136 MB): batch 1 5.2 -> 3.0 ms, batch 16 16.4 -> 4.2 ms, batch 64 31 -> 10.9 ms,
300 prefill rows 122 -> 55 ms.

Those ops are private, so a weight is packed only after a check that the packed product matches
the plain one; when the ops are missing, fail or the dtype is not float32 the layer falls back to
``x @ W_t`` on a transposed contiguous copy (the next-fastest layout here). ``RTSERVE_ONEDNN=0``
forces the fallback.
"""
from __future__ import annotations

import os

import torch


def _onednn_usable() -> bool:
    return (os.environ.get("RTSERVE_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class FrozenLinear:
    """A frozen linear layer for inference, on any device (oneDNN-packed on CPU where it can be). ``weight``: (out, in) as ``nn.Linear`` stores it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        weight = weight.detach()
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.packed = None
        if weight.dtype == torch.float32 and weight.device.type == "cpu" and _onednn_usable():
            self.packed = self._pack(weight)
        self.weight_t = weight.t().contiguous() if self.packed is None else None

    def _pack(self, weight: torch.Tensor):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            got = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            want = x @ weight.t() + (self.bias if self.bias is not None else 0)
            scale = float(want.abs().max()) + 1e-6
            if got.shape != want.shape or float((got - want).abs().max()) > 1e-4 * scale:
                return None
            return packed
        except (RuntimeError, TypeError):
            return None

    @property
    def onednn(self) -> bool:
        return self.packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y
