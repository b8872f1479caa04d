"""Row argmax / max through numpy on CPU: the same answers as torch's, first index on ties."""
import pytest
import torch

from rtserve.llm.reductions import argmax_rows, max_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_argmax_and_max_match_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 301, generator=g).to(dtype)
    x[2, 5] = x[2, 200] = 50.0          # a tie: the first index wins in both
    x[4] = 0.0                           # all equal
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(x)[2] == 5 and argmax_rows(x)[4] == 0
    values, indices = max_rows(x)
    ref = x.max(dim=1)
    assert indices.tolist() == ref.indices.tolist()
    assert torch.equal(values, ref.values)


def test_strided_rows_and_inference_tensors():
    x = torch.randn(40, 64)[::3, 1:]     # not contiguous
    with torch.inference_mode():
        y = torch.randn(5, 64)
        assert argmax_rows(y).tolist() == y.argmax(dim=-1).tolist()
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(x).dtype == torch.int64


def test_the_result_is_writable():  # the sampler writes drawn tokens into the greedy ones
    t = argmax_rows(torch.randn(3, 10))
    t[torch.tensor([1])] = torch.tensor([7])
    assert t[1] == 7


def test_finite_rows_finds_nan_and_inf_and_never_overflows():
    from rtserve.llm.reductions import finite_rows

    x = torch.full((4, 1000), 3.0e38)  # finite; their float32 sum would overflow
    x[1, 7] = float("nan")
    x[2, 999] = float("-inf")
    x[3] = -3.0e38
    assert finite_rows(x) == [True, False, False, True]
    assert finite_rows(x.double()) == [True, False, False, True]
    assert finite_rows(x[:, :0]) == [True] * 4
