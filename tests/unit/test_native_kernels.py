"""rtserve's native CPU kernels (llm/native/kernels.cpp): the products against PyTorch in every
weight format, the checks that turn bad arguments into errors, and the build's fallback."""
from __future__ import annotations

import shutil

import pytest
import torch

from rtserve.llm import native


@pytest.fixture(scope="module")
def ops():
    nat = native.ops()
    if nat is None:
        if shutil.which("g++") or shutil.which("c++"):  # a compiler is here: the build must work
            pytest.fail(f"the native kernels did not build: {native.unavailable_reason()}")
        pytest.skip("no C++ compiler here")
    return nat


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n,k", [(96, 256), (37, 70), (5, 1)])  # 70, 1: tails past the vector width
def test_float32_and_float16_products_match_torch(ops, rows, n, k):
    x, w, b = _rand(rows, k), _rand(n, k, seed=1), _rand(n, seed=2)
    want = x @ w.t() + b
    got = ops.linear(x, w, None, b)
    assert got.shape == (rows, n)
    assert torch.allclose(got, want, atol=1e-5 * k, rtol=1e-5)
    h = w.half()
    assert torch.allclose(ops.linear(x, h, None, None), x @ h.float().t(), atol=1e-5 * k, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_int8_products_with_row_and_group_scales(ops, rows):
    n, k = 50, 128
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    x = _rand(rows, k)
    s_row = torch.rand(n, generator=torch.Generator().manual_seed(4)) + 0.1
    want = x @ (q.float() * s_row[:, None]).t()
    assert torch.allclose(ops.linear(x, q, s_row, None), want, rtol=1e-5, atol=1e-3)
    s_grp = torch.rand(n, k // 32, generator=torch.Generator().manual_seed(5)) + 0.1
    want = x @ (q.float() * s_grp.repeat_interleave(32, 1)).t()
    assert torch.allclose(ops.linear(x, q, s_grp, None), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 13, 64, 130])  # every tile height, tails, row blocks
@pytest.mark.parametrize("n,k", [(64, 70), (48, 1100), (16, 1)])  # 48: panels not a multiple of 4 or 2; 1100: k
# pairs past one int32 chunk
def test_products_with_weights_in_panels_match_torch(ops, rows, n, k):
    """Weights in panels of 16 outputs (native.pack_panels): float32 with a bias, float16, and int8
    with scales per row give the products of the (N, K) weight."""
    x, w, b = _rand(rows, k), _rand(n, k, seed=1), _rand(n, seed=2)
    p = native.pack_panels(w)
    assert p.shape == (n // 16, k, 16) and torch.equal(p[-1, :, 3], w[n - 13])
    assert torch.allclose(ops.linear(x, p, None, b), x @ w.t() + b, atol=1e-5 * k, rtol=1e-5)
    h = w.half()
    assert torch.allclose(ops.linear(x, native.pack_panels(h), None, None), x @ h.float().t(), atol=1e-5 * k, rtol=1e-5)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    s = torch.rand(n, generator=torch.Generator().manual_seed(4)) + 0.1
    want = x @ (q.float() * s[:, None]).t()
    assert torch.allclose(ops.linear(x, native.pack_panels(q), s, None), want, rtol=1e-5, atol=1e-3 * k)
    pairs = native.pack_int8_pairs(q) if k % 2 == 0 else None
    if pairs is not None:  # int8 panels of k pairs, int16 activations (AVX2, AVX-512 VNNI): ~3e-5 of the largest
        assert pairs.shape == (n // 16, k // 2, 32) and pairs[-1, 1, 7] == q[n - 13, 3]
        if ops.int8_pairs():
            got = ops.linear(x, pairs, s, b)
            assert float((got - want - b).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-5
        else:
            with pytest.raises(RuntimeError, match="w must be contiguous"):
                ops.linear(x, pairs, s, None)


def _int4(n, k, group, seed=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // group, generator=g) + 0.1) * scale
    return q, s, q.float() * s.repeat_interleave(group, 1)


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 13, 64, 130])  # the nibble tiles (1, 2), widened panels (3+)
@pytest.mark.parametrize("n,k,group", [(64, 96, 32), (48, 1100, 10), (16, 2, 2), (128, 512, 128)])  # 48: 3 panels
def test_int4_products_in_panels_match_the_dequantized_weight(ops, rows, n, k, group):
    q, s, deq = _int4(n, k, group)
    w, ws = native.pack_int4(q, s)
    assert w.shape == (n // 16, k // 2, 16) and ws.shape == (n // 16, k // group, 16)
    assert int(w[-1, 0, 3]) == (int(q[n - 13, 0]) + 8) | ((int(q[n - 13, 1]) + 8) << 4)
    x, b = _rand(rows, k), _rand(n, seed=2)
    want = x @ deq.t() + b
    got = ops.linear(x, w, ws, b)
    # AVX-512 VNNI builds, groups that nest with x's 128-value chunks: int16 pairs against int16 activations
    gh = group // 2
    tol = 1e-4 if ops.int8_pairs_default() and (64 % gh == 0 or gh % 64 == 0) else 1e-5
    assert float((got - want).abs().max()) <= tol * float(want.abs().max()) + 1e-5
    x[-1, k // 2] = float("nan")  # a NaN activation spoils its own row's products only
    got = ops.linear(x, w, ws, b)
    assert not got[-1].isfinite().any() and got[:-1].isfinite().all()


def test_int4_weights_need_panel_group_scales(ops):
    q, s, _ = _int4(32, 64, 16)
    w, ws = native.pack_int4(q, s)
    x = _rand(2, 64)
    for bad in (None, ws.reshape(32, 4), ws[:, :3].contiguous(), ws.double(), torch.ones(2, 64 // 3, 16)):
        with pytest.raises(RuntimeError, match="int4 weight needs float32 group scales"):
            ops.linear(x, w, bad, None)
    with pytest.raises(RuntimeError, match="group scales"):  # groups of 1: odd
        ops.linear(x, w, torch.ones(2, 64, 16), None)
    with pytest.raises(RuntimeError, match="int4 weight must be contiguous uint8"):
        ops.linear(_rand(2, 32), w, ws, None)  # K does not match
    with pytest.raises(RuntimeError, match="int4 weight must be contiguous uint8"):
        ops.linear(x, w.reshape(64, 16), ws, None)  # not in panels
    assert native.pack_int4(q, torch.ones(32, 64)) is None  # groups of 1


def test_decode_layer_reads_int4_weights_as_their_dequantized_values(ops):
    a = _layer_args()
    names = ("qkv_w", "o_w", "gu_w", "down_w")
    packed, deq = {}, dict(a)
    for i, name in enumerate(names):
        n, k = a[name].shape
        q, s, d = _int4(n, k, 16, seed=10 + i, scale=0.02)
        packed[name] = native.pack_int4(q, s)
        deq[name] = d
    want = _call(ops, deq)
    b = dict(a, kv_cache=torch.zeros_like(a["kv_cache"]))
    got = ops.decode_layer(b["x"], b["ln1"], *packed["qkv_w"], None, None, None, *packed["o_w"], b["ln2"],
                           *packed["gu_w"], *packed["down_w"], b["rope"], b["kv_cache"], b["blocks"],
                           b["context_lens"], b["slots"], b["nh"], b["nkv"], 1e-6, 0.25)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(b["kv_cache"], deq["kv_cache"], rtol=1e-4, atol=1e-4)  # the same K / V written


def test_panels_need_whole_panels_and_row_scales(ops):
    assert native.pack_panels(_rand(40, 8)) is None  # 40 outputs: not whole panels of 16
    x, p = _rand(2, 8), native.pack_panels(_rand(32, 8))
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        ops.linear(x, _rand(2, 8, 8), None, None)  # panels of 8
    with pytest.raises(RuntimeError, match="panels takes float32 scales"):
        ops.linear(x, native.pack_panels(torch.zeros(32, 8, dtype=torch.int8)), torch.ones(32, 1), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear(x, p, None, torch.ones(16))


def test_zero_rows_give_an_empty_product_in_every_layout(ops):
    q4, s4, _ = _int4(64, 32, 16)
    q8 = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    for w, s in ((native.pack_panels(_rand(64, 32)), None), (native.pack_panels(q8), torch.ones(64)),
                 native.pack_int4(q4, s4), (_rand(64, 32), None)):
        assert ops.linear(torch.empty(0, 32), w, s, torch.zeros(64)).shape == (0, 64)


def test_bad_arguments_are_errors_not_crashes(ops):
    x, w = _rand(2, 16), _rand(8, 16)
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        ops.linear(x.double(), w, None, None)
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        ops.linear(x, _rand(16, 8).t(), None, None)  # a transposed view
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        ops.linear(x, _rand(8, 15), None, None)  # K does not match
    with pytest.raises(RuntimeError, match="int8 weight needs float32 scales"):
        ops.linear(x, torch.zeros(8, 16, dtype=torch.int8), None, None)
    with pytest.raises(RuntimeError, match="int8 weight needs float32 scales"):
        ops.linear(x, torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 3), None)  # groups do not divide K
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear(x, w, None, torch.ones(7))


def _layer_args(m=2, h=64, nh=4, nkv=2, d=16, inter=96, blocks=8, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    cache = torch.zeros(2, blocks, nkv, bs, d)
    rope = torch.stack([torch.ones(m, d), torch.zeros(m, d)], 1)  # position 0: the identity rotation
    return dict(x=r(m, h), ln1=torch.ones(h), qkv_w=r((nh + 2 * nkv) * d, h), o_w=r(h, nh * d), ln2=torch.ones(h),
                gu_w=r(2 * inter, h), down_w=r(h, inter), rope=rope, kv_cache=cache,
                blocks=torch.arange(m, dtype=torch.long).view(m, 1), context_lens=torch.ones(m, dtype=torch.long),
                slots=torch.arange(m, dtype=torch.long) * bs, nh=nh, nkv=nkv)


def _call(ops, a):
    return ops.decode_layer(a["x"], a["ln1"], a["qkv_w"], None, None, None, None, a["o_w"], None, a["ln2"], a["gu_w"],
                            None, a["down_w"], None, a["rope"], a["kv_cache"], a["blocks"], a["context_lens"],
                            a["slots"], a["nh"], a["nkv"], 1e-6, 0.25)


def test_decode_layer_of_first_tokens_matches_a_plain_layer(ops):
    """Each sequence's first token attends only to itself: attention output = its V (per KV head)."""
    a = _layer_args()
    got = _call(ops, a)
    x, h, d, nh, nkv = a["x"], 64, 16, 4, 2
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    qkv = rms(x, a["ln1"]) @ a["qkv_w"].t()
    v = qkv[:, (nh + nkv) * d:].view(2, nkv, d)
    att = v.repeat_interleave(nh // nkv, 1).reshape(2, nh * d)
    y = x + att @ a["o_w"].t()
    gu = rms(y, a["ln2"]) @ a["gu_w"].t()
    want = y + (torch.nn.functional.silu(gu[:, :96]) * gu[:, 96:]) @ a["down_w"].t()
    assert torch.allclose(got, want, atol=1e-5)
    k = qkv[:, nh * d:(nh + nkv) * d].view(2, nkv, d)  # written where the slots say: block i, offset 0
    assert torch.allclose(a["kv_cache"][0, :2, :, 0], k) and torch.allclose(a["kv_cache"][1, :2, :, 0], v)


@pytest.mark.parametrize("d", [16, 32, 40, 64, 128])  # head sizes of 4, 8 and 16 vectors, and others
def test_decode_attention_reads_each_context_through_its_block_table(ops, d):
    g = torch.Generator().manual_seed(d)
    nb, nkv, bs, nh = 12, 2, 4, 4
    cache = torch.randn(2, nb, nkv, bs, d, generator=g)
    lens = torch.tensor([1, 4, 7, 13, 20])  # one token, one full block, partial last blocks, every block
    blocks = torch.stack([torch.randperm(nb, generator=g)[:5] for _ in lens])
    q = torch.randn(len(lens), nh, d, generator=g)
    got = ops.decode_attention(q, cache, blocks, lens, d ** -0.5)
    for r, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        k = cache[0, blocks[r, pos // bs], :, pos % bs]  # (n, nkv, d) in context order
        v = cache[1, blocks[r, pos // bs], :, pos % bs]
        kh, vh = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)  # (n, nh, d)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[r], kh) * d ** -0.5, -1)
        want = torch.einsum("hn,nhd->hd", w, vh)
        assert torch.allclose(got[r], want, atol=1e-5), (r, float((got[r] - want).abs().max()))


def test_decode_layer_refuses_what_would_read_outside_the_cache(ops):
    a = _layer_args()
    a["context_lens"] = torch.tensor([1, 5])  # 5 tokens need 2 blocks; the table has 1
    with pytest.raises(RuntimeError, match="out of range"):
        _call(ops, a)
    a = _layer_args()
    a["blocks"] = torch.tensor([[0], [8]])  # the cache has blocks 0-7
    with pytest.raises(RuntimeError, match="block out of range"):
        _call(ops, a)
    a = _layer_args()
    a["slots"] = torch.tensor([0, 32])
    with pytest.raises(RuntimeError, match="out of range"):
        _call(ops, a)
    a = _layer_args()
    a["qkv_w"] = a["qkv_w"][:-1]
    with pytest.raises(RuntimeError, match="qkv must be"):
        _call(ops, a)


def test_without_the_kernels_ops_is_none_and_says_why(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("RTSERVE_NATIVE", "0")
    assert native.ops() is None
    assert native.unavailable_reason() == "RTSERVE_NATIVE=0"


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("RTSERVE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "library_path", lambda: tmp_path / "x" / "rtserve_native.so")
    assert native.ops() is None
    assert "no-such-compiler" in native.unavailable_reason() or "No such file" in native.unavailable_reason()
    assert "native CPU kernels unavailable" in caplog.text


CHECK_ISA = r"""
import sys, torch
from rtserve.llm import native
ops = native.ops()
assert ops is not None, native.unavailable_reason()
assert ops.isa() == sys.argv[1], ops.isa()
g = torch.Generator().manual_seed(0)
for rows in (1, 3, 5):
    for n, k in ((40, 96), (7, 37)):
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        assert torch.allclose(ops.linear(x, w, None, None), x @ w.t(), atol=1e-4 * k)
        h = w.half()
        assert torch.allclose(ops.linear(x, h, None, None), x @ h.float().t(), atol=1e-4 * k)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g)
        assert torch.allclose(ops.linear(x, q, s, None), x @ (q.float() * s[:, None]).t(), rtol=1e-5, atol=1e-3)
    for n, k in ((64, 37), (48, 16), (32, 600)):  # weights in panels: every tile height of each build, and tails
        for m in (rows, rows + 6, 17):
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            assert torch.allclose(ops.linear(x, native.pack_panels(w), None, None), x @ w.t(), atol=1e-4 * k)
            q, s = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g)
            want = x @ (q.float() * s[:, None]).t()
            assert torch.allclose(ops.linear(x, native.pack_panels(q), s, None), want, rtol=1e-5, atol=1e-3 * k)
            if ops.int8_pairs() != (sys.argv[2] == "pairs"):
                raise AssertionError(f"int8 pairs: {ops.int8_pairs()}, expected {sys.argv[2]}")
            if k % 2 == 0 and ops.int8_pairs():
                got = ops.linear(x, native.pack_int8_pairs(q), s, None)
                assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
                x[-1, k // 2] = float("nan")  # a NaN is not rounded to a finite int16
                got = ops.linear(x, native.pack_int8_pairs(q), s, None)
                assert not got[-1].isfinite().any() and got[:-1].isfinite().all()
    for n, k, group in ((64, 96, 32), (48, 40, 8)):  # int4 panels: the nibble tiles and the widened panels
        q4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        s4 = torch.rand(n, k // group, generator=g) + 0.1
        w4, ws4 = native.pack_int4(q4, s4)
        for m in (rows, rows + 6):
            x = torch.randn(m, k, generator=g)
            want = x @ (q4.float() * s4.repeat_interleave(group, 1)).t()
            assert float((ops.linear(x, w4, ws4, None) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    q = torch.randint(-127, 128, (9, 64), dtype=torch.int8, generator=g)
    s = torch.rand(9, 2, generator=g)
    x = torch.randn(rows, 64, generator=g)
    assert torch.allclose(ops.linear(x, q, s, None), x @ (q.float() * s.repeat_interleave(32, 1)).t(), rtol=1e-5, atol=1e-3)
print("ok")
"""


BUILD_ONLY = "from rtserve.llm import native; native.build(); print('ok')"
# -march targets: the AVX2 code (int8 pairs through vpmaddwd), the portable code, AVX-512 without VNNI
# (int8 widened to float) and with it (pairs through vpdpwssd), and the CPU flags each needs to run
ISA_BUILDS = [("haswell", "avx2", "pairs", ("avx2", "fma", "f16c")), ("x86-64", "scalar", "panels", ()),
              ("skylake-avx512", "avx512", "panels", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
              ("icelake-server", "avx512", "pairs", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))]


@pytest.mark.slow
@pytest.mark.parametrize("arch,isa,int8,needs", ISA_BUILDS, ids=[b[0] for b in ISA_BUILDS])
def test_every_isa_build_computes_the_same(ops, arch, isa, int8, needs, tmp_path):
    """The vector code for each instruction set, built here with another -march and run in a fresh
    process (one kernel library per process); only compiled where this CPU cannot run it, and
    skipped for the build the native one already is (every other test in this file runs that)."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 targets")
    if (ops.isa(), ops.int8_pairs()) == (isa, int8 == "pairs") and os.environ.get("RTSERVE_NATIVE_ARCH") is None:
        pytest.skip(f"the native build here is the {isa} code ({int8}): every other test in this file runs it")
    runs = set(needs) <= set(native._cpu_flags().split())
    env = dict(os.environ, RTSERVE_NATIVE_ARCH=arch, RTSERVE_NATIVE_CACHE=str(tmp_path))
    cmd = [sys.executable, "-c", CHECK_ISA, isa, int8] if runs else [sys.executable, "-c", BUILD_ONLY]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_int8_pairs_scale_each_chunk_of_x_on_its_own(ops):
    """Panels of k pairs quantize x to int16 with a scale for each 128 values: one large value costs
    precision in its own chunk only (a scale a row would round the others to steps of 1e4 / 32767)."""
    if not ops.int8_pairs():
        pytest.skip("no int8 panels of k pairs in this build")
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-127, 128, (64, 512), dtype=torch.int8, generator=g)
    s = torch.rand(64, generator=g) + 0.1
    x = torch.randn(3, 512, generator=g)
    x[:, :128] = 0.0
    x[:, 0] = 1e4  # quantized exactly: the largest value of its chunk
    w = q.float() * s[:, None]
    got = ops.linear(x, native.pack_int8_pairs(q), s, None)
    rest = x[:, 128:].abs() @ w[:, 128:].abs().t()  # the size of the part the other chunks carry
    assert float(((got - x @ w.t()).abs() / rest).max()) < 1e-4
    for bad in (float("nan"), float("inf")):  # not rounded to a finite int16: the row's products are not finite
        for col in (3, 500, 513):  # in a vector, in a later chunk, in the short last chunk (scalar code)
            y = torch.randn(3, 514, generator=g)
            y[1, col] = bad
            out = ops.linear(y, native.pack_int8_pairs(torch.cat([q, q[:, :2]], 1)), s, None)
            assert not out[1].isfinite().any() and out[[0, 2]].isfinite().all()


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.float16])
def test_decode_logits_is_the_layers_then_norm_and_head(ops, head_dtype):
    """decode_logits (a whole decode step in one call) = decode_layers, RMSNorm and the LM head on
    the rows asked for, in their order."""
    a, b = _layer_args(m=3), _layer_args(m=3)  # the same tensors, two caches (each call writes its own)
    flat = [a["ln1"], a["qkv_w"], None, None, None, None, a["o_w"], None, a["ln2"], a["gu_w"], None, a["down_w"], None]
    head = (_rand(40, 64, seed=9) * 0.3).to(head_dtype)
    norm = torch.rand(64, generator=torch.Generator().manual_seed(8)) + 0.5
    idx = torch.tensor([2, 0])
    args = (a["rope"], a["blocks"], a["context_lens"], a["slots"], 4, 2, 1e-6, 0.25)
    got = ops.decode_logits(a["x"], flat * 2, [a["kv_cache"], torch.zeros_like(a["kv_cache"])], *args[:4], *args[4:],
                            idx, norm, head)
    y = ops.decode_layers(b["x"], flat * 2, [b["kv_cache"], torch.zeros_like(b["kv_cache"])], *args)
    want = torch.rms_norm(y[idx], (64,), norm, 1e-6) @ head.float().t()
    assert got.shape == (2, 40) and torch.allclose(got, want, atol=1e-4)
    with pytest.raises(RuntimeError, match="logits_index out of range"):
        ops.decode_logits(a["x"], flat * 2, [a["kv_cache"], a["kv_cache"].clone()], *args, torch.tensor([3]), norm, head)


def test_decode_logits_with_an_int8_head_rescores_its_top_k_exactly(ops):
    """An int8 head (head_s) with head_exact: the k logits the int8 weights rank highest are the
    exact weights' values, the others the int8 weights'; bad k or shapes are errors."""
    a = _layer_args(m=2)
    flat = [a["ln1"], a["qkv_w"], None, None, None, None, a["o_w"], None, a["ln2"], a["gu_w"], None, a["down_w"], None]
    exact = (_rand(100, 64, seed=9) * 0.3).to(torch.float16)
    s = exact.float().abs().amax(1) / 127
    q = (exact.float() / s[:, None]).round().to(torch.int8)
    norm = torch.rand(64, generator=torch.Generator().manual_seed(8)) + 0.5
    idx = torch.tensor([1, 0])
    args = (a["rope"], a["blocks"], a["context_lens"], a["slots"], 4, 2, 1e-6, 0.25)
    cache = a["kv_cache"]
    y = ops.decode_layers(a["x"], flat, [cache.clone()], *args)
    x = torch.rms_norm(y[idx], (64,), norm, 1e-6)
    approx, want = x @ (q.float() * s[:, None]).t(), x @ exact.float().t()
    got = ops.decode_logits(a["x"], flat, [cache.clone()], *args, idx, norm, q, s, exact, 5)
    top = approx.topk(5, dim=-1).indices
    assert torch.allclose(got.gather(1, top), want.gather(1, top), atol=1e-4)
    rest = torch.ones_like(got, dtype=torch.bool).scatter_(1, top, False)
    assert torch.allclose(got[rest], approx[rest], atol=1e-4)
    assert not torch.allclose(approx.gather(1, top), want.gather(1, top), atol=1e-4)  # (the rescoring changed them)
    for k in (0, 65):
        with pytest.raises(RuntimeError, match="exact_top_k"):
            ops.decode_logits(a["x"], flat, [cache.clone()], *args, idx, norm, q, s, exact, k)
    with pytest.raises(RuntimeError, match="head_exact"):
        ops.decode_logits(a["x"], flat, [cache.clone()], *args, idx, norm, q, s, exact[:50], 5)
