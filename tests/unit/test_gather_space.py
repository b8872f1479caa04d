"""GatherSpace: one buffer reused for the step's context gathers; it grows, and a new dtype gets a
new buffer."""
import torch

from rtserve.llm.attention import GatherSpace


def test_reuses_grows_and_follows_dtype():
    space = GatherSpace()
    f32 = torch.zeros(1)
    a = space.take((2, 3, 4), f32)
    b = space.take((2, 2, 4), f32)
    assert a.shape == (2, 3, 4) and b.shape == (2, 2, 4)
    assert b.data_ptr() == a.data_ptr()            # the same memory, smaller view
    c = space.take((2, 10, 4), f32)
    assert c.numel() == 80                          # grew
    d = space.take((2, 3, 4), torch.zeros(1, dtype=torch.float64))
    assert d.dtype == torch.float64
