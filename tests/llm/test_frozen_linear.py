"""FrozenLinear: every layout computes x @ W.T + b; the automatic choice is one of them, measured
once per shape; a forced layout is honoured and a wrong name refused."""
import pytest
import torch
import torch.nn.functional as F

from rtserve.llm import frozen_linear
from rtserve.llm.frozen_linear import LAYOUTS, FrozenLinear


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_layout_matches_linear(monkeypatch, layout, bias):
    monkeypatch.setenv("RTSERVE_MATMUL", layout)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    lin = FrozenLinear(w, b)
    if layout != "onednn" or frozen_linear._onednn_usable():
        assert lin.layout == lin.layout_one == layout
    for m in (1, 5, 64):
        x = torch.randn(m, 32, generator=g)
        torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    x3 = torch.randn(2, 3, 32, generator=g)  # leading dims beyond one
    torch.testing.assert_close(lin(x3), F.linear(x3, w, b), rtol=1e-4, atol=1e-4)


def test_auto_measures_once_per_shape(monkeypatch):
    monkeypatch.delenv("RTSERVE_MATMUL", raising=False)
    calls = []
    real = frozen_linear.measure
    monkeypatch.setattr(frozen_linear, "measure", lambda c, k: calls.append(sorted(c)) or real(c, k))
    monkeypatch.setattr(frozen_linear, "_CHOSEN", {})
    w = torch.randn(40, 24)
    a, b = FrozenLinear(w), FrozenLinear(w * 2)
    assert a.layout in LAYOUTS and a.layout_one in LAYOUTS
    assert (b.layout, b.layout_one) == (a.layout, a.layout_one)
    assert len(calls) == 1 and {"mm", "linear"} <= set(calls[0])
    for m in (1, 3):  # one row and several may take different layouts
        x = torch.randn(m, 24)
        torch.testing.assert_close(b(x), F.linear(x, w * 2), rtol=1e-4, atol=1e-4)


def test_unknown_layout_is_refused(monkeypatch):
    monkeypatch.setenv("RTSERVE_MATMUL", "blas")
    with pytest.raises(ValueError, match="RTSERVE_MATMUL"):
        FrozenLinear(torch.randn(4, 4))
