"""Weight-only quantized linear layers for the decoders: int8 per output channel, or int4 in groups
along the input dimension, symmetric (no zero points). Activations stay in the model's dtype.

- CPU: kernels that use the int8 / int4 weight as it is (``cpu_quant.py``: PyTorch's weight-only
  int8 and int4 kernels and its int8 x int8 matmul, with float32 activations kept to ~16 bits),
  the fastest for the weight's shape timed at load for small and large batches; the dequantizing
  matmul (the weight expanded per call) only where none of them works. Memory at rest drops 4x
  (int8) / ~7x (int4) against float32, and batch-1 decode reads a quarter / an eighth of the bytes.
- CUDA: PyTorch's fused kernels (``_weight_int8pack_mm``; ``_weight_int4pack_mm``, the tinygemm int4
  kernel for bf16), used only after a check at load that they reproduce the dequantizing matmul on
  a random input; otherwise the dequantizing path. Batch-1 decode reads the weights once per token,
  so halving / quartering their bytes is what makes it faster.
"""
from __future__ import annotations

import torch

METHODS = {"int8-weight": 8, "int4-weight": 4}
SIDECAR = "quantization.json"  # the recipe beside a quantized checkpoint (compress/llm_quant.py writes it)


def quantize(w: torch.Tensor, bits: int, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q, scales). int8: q int8 (out, in), scales (out,). int4: q int8 in
    [-8, 7] (out, in), scales (out, in / group_size)."""
    w = w.detach().float()
    if bits == 8:
        scales = (w.abs().amax(1) / 127.0).clamp(min=1e-12)
        return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales
    if bits == 4:
        out_f, in_f = w.shape
        if in_f % group_size:
            raise ValueError(f"int4: input size {in_f} is not a multiple of the group size {group_size}")
        wg = w.reshape(out_f, in_f // group_size, group_size)
        amax = wg.abs().amax(-1).clamp(min=1e-12)
        # per group, the scale (a clipped range) that minimises the squared error: with 16 levels,
        # clipping a few outliers buys finer steps for everything else
        best_err = best_scale = None
        for r in torch.linspace(1.0, 0.5, 11).tolist():
            sc = amax * r / 7.0
            err = (torch.round(wg / sc[..., None]).clamp(-8, 7) * sc[..., None] - wg).pow(2).sum(-1)
            if best_err is None:
                best_err, best_scale = err, sc
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, sc, best_scale)
        q = torch.round(wg / best_scale[..., None]).clamp(-8, 7).reshape(out_f, in_f).to(torch.int8)
        return q, best_scale
    raise ValueError(f"bits must be 8 or 4, got {bits}")


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if scales.dim() == 1:
        return (q.to(dtype) * scales.to(dtype)[:, None])
    group = q.shape[1] // scales.shape[1]
    return (q.to(dtype) * scales.to(dtype).repeat_interleave(group, 1))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] (out, in) -> uint8 (out, in / 2): two offset nibbles a byte (storage)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


class QuantLinear:
    """``y = x @ dequant(q, scales).T (+ b)``; see the module docstring for the kernels used."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.bits, self.dtype, self.bias = bits, dtype, bias
        self.out_features, self.in_features = q.shape
        self.group_size = self.in_features // scales.shape[1] if scales.dim() == 2 else self.in_features
        self.kernel = "dequant"
        self._fast = None
        if q.device.type == "cuda":
            self._fast = self._cuda_kernel(q, scales)
        elif q.device.type == "cpu":
            self._fast = self._cpu_kernel(q, scales)
        if self._fast is None:  # keep the compact form; expand per call
            self.q = q if bits == 8 else pack_int4(q)
            self.scales = scales.to(dtype)

    def _cpu_kernel(self, q, scales):
        from . import cpu_quant

        choice = cpu_quant.choose(q, scales.float(), self.bits, self.group_size)
        if set(choice.names.values()) == {"dequant"}:
            return None  # the compact form below expands per call just the same, in less memory
        self.kernel = "cpu:" + ",".join(f"{rows}:{name}" for rows, name in choice.names.items())
        return choice

    def _cuda_kernel(self, q, scales):
        x = torch.randn(3, self.in_features, device=q.device, dtype=self.dtype)
        want = x @ dequantize(q, scales, self.dtype).t()
        try:
            if self.bits == 8:
                s = scales.to(self.dtype)
                fn = lambda a: torch._weight_int8pack_mm(a, q, s)  # noqa: E731
            else:
                if self.dtype != torch.bfloat16:
                    return None
                u = (q.to(torch.int16) + 8).to(torch.uint8)
                packed_u8 = ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()  # (N, K/2), even index high nibble
                packed = torch._convert_weight_to_int4pack(packed_u8, 8)
                # tinygemm dequantizes w = (u - 8) * scale + zero: with u = q + 8, zero 0 gives q * scale
                sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).to(self.dtype).contiguous()
                gs = self.group_size
                fn = lambda a: torch._weight_int4pack_mm(a, packed, gs, sz)  # noqa: E731
            got = fn(x)
            tol = 0.02 * float(want.abs().max()) + 1e-3
            if got.shape != want.shape or float((got.float() - want.float()).abs().max()) > tol:
                return None
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            return None
        self.kernel = f"cuda-int{self.bits}"
        return fn

    def native_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, float32 scales) for the native decode layer, where the native kernel built for this
        layer: int8 in panels or (out, in) with scales (out,), or int4 in panels with group scales."""
        return getattr(self._fast, "native", None)

    @property
    def weight_bytes(self) -> int:
        if self._fast is not None:
            nbytes = getattr(self._fast, "nbytes", None)
            return nbytes if nbytes is not None else self.out_features * self.in_features * self.bits // 8
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast is not None:
            y = self._fast(x)
        else:
            q = self.q if self.bits == 8 else unpack_int4(self.q)
            y = x @ dequantize(q, self.scales, x.dtype).t()
        return y + self.bias if self.bias is not None else y


def _panels(w: torch.Tensor) -> torch.Tensor:
    from .native import pack_panels

    p = pack_panels(w)
    return w.contiguous() if p is None else p


class HalfHead:
    """The LM head in float16, converted when the model loads (older int8 checkpoints' recipes ask for
    it: ``"lm_head": {"dtype": "float16"}``). In small models the head is the tied input embedding,
    which the lookup needs in float32, and it is the largest matrix of a decode step (48% of the 34M
    Llama's float32 bytes); float16 halves what a step reads of it at 11 bits of mantissa.

    Batches of up to ``native_rows`` rows (measured at load) use the native kernel on the float16
    weight; larger ones, or all where the native kernels are unavailable, a float32 copy of the same
    float16 values (``FrozenLinear``), so results do not depend on which ran."""

    exact_top_k = 0  # (Int8Head's: none here, every logit is computed from the weight as it is)

    def __init__(self, weight: torch.Tensor) -> None:
        half = weight.detach().to(torch.float16).contiguous()  # not kept: the panels hold the same values
        self.weight, self.scale = _panels(half), None  # what the native kernel reads
        self._setup(half.float())

    def _setup(self, many: torch.Tensor) -> None:
        from .frozen_linear import FrozenLinear
        from .native import ops

        self.many = FrozenLinear(many)
        self.native_rows = 0
        nat = ops()
        if nat is not None and self.weight.device.type == "cpu":
            from .native_decode import native_rows
            self.native_rows = native_rows(lambda x: nat.linear(x, self.weight, self.scale, None), self.many,
                                           many.shape[1])

    def approximate(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.native_rows:
            from .native import ops
            return ops().linear(x.float().contiguous(), self.weight, self.scale, None)
        return self.many(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.approximate(x)


class Int8Head(HalfHead):
    """The LM head in int8 (a scale per vocabulary row), with its ``exact_top_k`` largest logits of
    every row recomputed from a float16 copy: what int8 checkpoints' recipes ask for, ``"lm_head":
    {"dtype": "int8", "exact_top_k": 8}``. A decode step reads a quarter of the float32 head's bytes
    (the float16 copy only for k rows), and the ranking at the top, where greedy and nucleus
    sampling look, is that of the float16 head: the demo LM's top-1 agreement with the unquantized
    model is the float16 head's, 98.91% over 1,644 positions and 99.16% over 6,788 (int8 alone:
    98.72%; in groups of 32 as GGUF's q8_0: 98.78%); mean KL 0.000164 against 0.000146. Below the
    top k, logits (and their probabilities) carry int8 rounding, as every other int8 layer's do.

    Small batches run the native int8 kernel, larger ones a float32 copy of the dequantized values;
    the native decode step (``decode_logits``) rescoring in C++ what ``rescore`` does here."""

    def __init__(self, weight: torch.Tensor, exact_top_k: int = 8) -> None:
        if not 1 <= exact_top_k <= min(64, weight.shape[0]):
            raise ValueError(f"lm_head exact_top_k must be in [1, {min(64, weight.shape[0])}], got {exact_top_k}")
        self.exact_top_k = exact_top_k
        self.half = weight.detach().to(torch.float16).contiguous()
        from .native import pack_int8

        q, s = quantize(weight, 8)
        self.weight, self.scale = pack_int8(q), s.contiguous()
        self._setup(q.float() * s[:, None])

    def rescore(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        idx = logits.topk(self.exact_top_k, dim=-1).indices  # (R, k)
        exact = torch.einsum("rh,rkh->rk", x.float(), self.half[idx].float())
        return logits.scatter_(1, idx, exact)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rescore(x, self.approximate(x))


def check_head_spec(spec) -> None:
    """Raises ValueError unless ``spec`` is an LM head a quantized checkpoint's recipe may ask for."""
    if spec == {"dtype": "float16"}:
        return
    if isinstance(spec, dict) and spec.get("dtype") == "int8" and set(spec) <= {"dtype", "exact_top_k"}:
        k = spec.get("exact_top_k", 8)
        if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64:
            return
    raise ValueError(f"'lm_head' must be {{\"dtype\": \"float16\"}} or {{\"dtype\": \"int8\", \"exact_top_k\": k}} "
                     f"with k in [1, 64], got {spec!r}")


def head_from_recipe(weight: torch.Tensor, spec) -> HalfHead:
    """The LM head a quantized checkpoint's recipe asks for (``"lm_head"``, see ``check_head_spec``),
    made from the float weight at load."""
    check_head_spec(spec)
    if spec["dtype"] == "float16":
        return HalfHead(weight)
    return Int8Head(weight, spec.get("exact_top_k", 8))


def read_quantized(path, device: torch.device) -> tuple[dict | None, dict]:
    """For a quantized checkpoint folder: (recipe, {weight name: (q int8 (out, in), scales)});
    (None, {}) for a plain one. Raises ValueError naming a missing quantized tensor."""
    import json
    from pathlib import Path

    from .weights import check_finite, checkpoint_files, open_checkpoint

    side = Path(path) / SIDECAR
    if not side.is_file():
        return None, {}
    recipe = json.loads(side.read_text())
    if recipe.get("bits") not in (4, 8):
        raise ValueError(f"{side}: 'bits' must be 4 or 8")
    tensors = {}
    for f in checkpoint_files(Path(path)):
        with open_checkpoint(f) as st:
            keys = set(st.keys())
            for name in recipe.get("modules", []):
                if name + ".qweight" in keys and name + ".scales" in keys:
                    q = st.get_tensor(name + ".qweight")
                    q = q if recipe["bits"] == 8 else unpack_int4(q)
                    scales = st.get_tensor(name + ".scales")
                    check_finite(scales, f"{f.name}: tensor '{name}.scales'")
                    tensors[name] = (q.to(device), scales.to(device))
    missing = [m for m in recipe.get("modules", []) if m not in tensors]
    if missing:
        raise ValueError(f"{path}: quantized tensor '{missing[0]}.qweight' (or its .scales) is missing")
    return recipe, tensors
