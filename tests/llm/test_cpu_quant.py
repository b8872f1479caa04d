"""The CPU kernels of the weight-only quantized layers (llm/cpu_quant.py) against the dequantized
float reference, the choice made at load, and the engine's agreement with and without them."""
from __future__ import annotations

import pytest
import torch

from rtserve.llm import cpu_quant, native
from rtserve.llm.quant_linear import QuantLinear, dequantize, quantize


def _weights(bits: int, n: int = 96, k: int = 256, group: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier row: its scale is far from the others'
    return quantize(w, bits, group_size=group)


def _x(rows: int, k: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[0, :8] *= 30  # an outlier activation, as after RMSNorm gains
    return x


# the largest error allowed, relative to the largest output: bfloat16 outputs carry 8 mantissa
# bits; the int8 x int8 matmul of a ~15-bit split is exact up to the split's rounding; the native
# kernel widens the int8 weight and keeps float32 activations (float32 rounding only); the native int4
# kernel too, but for one to eight rows it sums x * (q + 8) and subtracts 8 x the group's sum of x (a
# few float32 roundings more)
TOLERANCE = {"int8pack-bf16x2": 2 ** -8, "intmm-x2": 2e-4, "int4pack-bf16x2": 2 ** -8, "native-int8": 1e-6,
             "native-int4": 1e-5}


@pytest.mark.parametrize("name,bits", [("int8pack-bf16x2", 8), ("intmm-x2", 8), ("int4pack-bf16x2", 4),
                                       ("native-int8", 8), ("native-int4", 4)])
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_kernel_matches_the_dequantized_reference(name, bits, rows):
    q, s = _weights(bits)
    fn = cpu_quant.build(name, q, s, bits, group_size=64)
    if fn is None:
        pytest.skip(f"{name} is not available in this PyTorch build")
    x = _x(rows)
    want = x @ dequantize(q, s).t()
    got = fn(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got - want).abs().max()) / float(want.abs().max())
    tol = TOLERANCE[name]
    if name == "native-int8" and native.pack_int8(q).shape[-1] == 32:
        tol = 1e-4  # int8 panels of k pairs: int16 activations (15 bits), as intmm-x2's split
    if name == "native-int4" and native.ops().int8_pairs_default():
        tol = 1e-4  # AVX-512 VNNI builds: int4 as int16 pairs against int16 activations, the same
    assert err <= tol, err
    if name == "intmm-x2":  # the two int8 rows carry 3+ bits more than bfloat16, even with row 0's outliers
        rounded = x.bfloat16().float() @ dequantize(q, s).t()
        assert float((got - want).abs().mean()) < 0.125 * float((rounded - want).abs().mean())


def test_a_weight_at_an_unaligned_address_is_copied_first():
    # safetensors hands out tensors 24 bytes past a 64-byte boundary; _weight_int8pack_mm's AVX-512
    # path crashed on one before cpu_quant.aligned
    q, s = _weights(8)
    raw = torch.empty(q.numel() + 24, dtype=torch.int8)
    shifted = raw[24:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 64 != 0 and cpu_quant.aligned(shifted).data_ptr() % 64 == 0
    layer = QuantLinear(shifted, s, 8)
    x = _x(4)
    want = x @ dequantize(q, s).t()
    assert float((layer(x) - want).abs().max()) <= 2 ** -8 * float(want.abs().max())


def test_quant_linear_on_cpu_uses_a_kernel_and_adds_its_bias():
    q, s = _weights(8)
    bias = torch.linspace(-1, 1, q.shape[0])
    layer = QuantLinear(q, s, 8, bias)
    assert layer.kernel.startswith("cpu:") and "dequant" not in layer.kernel, layer.kernel
    for rows in (1, 20, 64):
        x = _x(rows)
        want = x @ dequantize(q, s).t() + bias
        assert float((layer(x) - want).abs().max()) <= 2 ** -8 * float(want.abs().max())
    assert layer.weight_bytes == q.numel() + 4 * q.shape[0]  # the int8 kernels share one weight


def test_int4_layer_keeps_int4_memory():
    q, s = _weights(4)
    layer = QuantLinear(q, s, 4)
    if layer.kernel == "dequant":
        pytest.skip("no int4 kernel in this PyTorch build")
    assert layer.weight_bytes <= q.numel() // 2 + 4 * s.numel()


def test_int4_layers_use_the_native_kernel_and_hand_it_to_the_decode_layer():
    if native.ops() is None:
        pytest.skip("native kernels not built here")
    q, s = _weights(4)
    layer = QuantLinear(q, s, 4, torch.linspace(-1, 1, q.shape[0]))
    assert layer.kernel == "cpu:1:native-int4,16:native-int4,64:native-int4", layer.kernel
    w, ws = layer.native_weights()
    assert w.dtype == torch.uint8 and w.shape == (6, 128, 16) and ws.shape == (6, 4, 16)
    assert native.in_features(w) == 256
    for rows in (1, 2, 5, 70):
        x = _x(rows)
        want = x @ dequantize(q, s).t() + layer.bias
        tol = 1e-4 if native.ops().int8_pairs_default() else 1e-5  # int16 pairs (AVX-512 VNNI)
        assert float((layer(x) - want).abs().max()) <= tol * float(want.abs().max())
    assert native.pack_int4(q[:40], s[:40]) is None  # 40 outputs: not whole panels
    assert native.pack_int4(q, torch.ones(96, 256 // 3)) is None  # a group size that does not divide K


def test_bfloat16_activations_go_straight_through():
    q, s = _weights(8)
    fn = cpu_quant.build("int8pack-bf16x2", q, s, 8, 64)
    if fn is None:
        pytest.skip("no int8pack kernel")
    x = _x(5).bfloat16()
    got = fn(x)
    want = x.float() @ dequantize(q, s).t()
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).abs().max()) <= 2 ** -6 * float(want.abs().max())


def test_choice_per_bucket_and_the_forced_kernel(monkeypatch):
    q, s = _weights(8, n=80, k=128)
    choice = cpu_quant.choose(q, s, 8, 128)
    assert set(choice.names) == set(cpu_quant.BUCKETS)
    assert set(choice.names.values()) <= {"int8pack-bf16x2", "intmm-x2", "native-int8"}
    assert {choice.names[16], choice.names[64]} <= set(cpu_quant.EXACT)  # batches: an exact kernel (timed)
    # a call uses the bucket nearest in log scale
    used = []
    spy = cpu_quant.Choice({b: (lambda x, b=b: used.append(b) or x) for b in cpu_quant.BUCKETS}, choice.names)
    for rows in (1, 3, 5, 16, 40, 300):
        spy(torch.zeros(rows, 128))
    assert used == [1, 1, 16, 16, 64, 64]
    monkeypatch.setenv("RTSERVE_QUANT_KERNEL", "intmm-x2")
    assert set(cpu_quant.choose(q, s, 8, 128).names.values()) == {"intmm-x2"}
    monkeypatch.setenv("RTSERVE_QUANT_KERNEL", "int4pack-bf16x2")
    with pytest.raises(ValueError, match="RTSERVE_QUANT_KERNEL=int4pack-bf16x2: not available for int8"):
        cpu_quant.choose(q, s, 8, 128)
