"""Structured and magnitude pruning, the distillation loss and loop (resumable), student specs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rtserve.compress.prune import PruneError, magnitude_prune, structured_prune
from rtserve.spec.layers import build_student, param_count
from rtserve.compress.train import TrainConfig, distill_loss, fit
from rtserve.demo import digits_cnn

EXAMPLE = torch.zeros(2, 1, 8, 8)


def test_pruning_channels_that_are_zero_changes_nothing():
    """Zero half of every prunable layer's channels, prune half: exactly those go (the ranking
    works) and the outputs are unchanged (every consumer, through Flatten, drops the right inputs)."""
    torch.manual_seed(0)
    model = digits_cnn().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (model[0], model[2], model[6]):
            dead = torch.randperm(m.weight.shape[0], generator=g)[: m.weight.shape[0] // 2]
            m.weight[dead] = 0.0
            m.bias[dead] = 0.0
    x = torch.rand(7, 1, 8, 8)
    pruned, report = structured_prune(model, 0.5, EXAMPLE)
    assert [(r.before, r.after) for r in report] == [(16, 8), (32, 16), (64, 32)]
    assert pruned[6].in_features == 16 * 4 * 4 and pruned[8].in_features == 32
    torch.testing.assert_close(pruned(x), model(x), atol=1e-6, rtol=1e-6)
    assert param_count(pruned) < 0.3 * param_count(model)


@pytest.mark.parametrize("model,ratio,needle", [
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 1.5, "ratio must be in"),
    (nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8), nn.Linear(8, 2)), 0.5, r"layer 1 \(LSTM\) is not supported"),
    (nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2)), 0.5, "groups=2"),
    (nn.Linear(4, 2), 0.5, "nn.Sequential"),
    (nn.Sequential(nn.Linear(4, 2)), 0.5, "at least two"),
])
def test_bad_pruning_requests_fail_before_any_change(model, ratio, needle):
    before = {k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, nn.parameter.UninitializedParameter)}
    with pytest.raises(PruneError, match=needle):
        structured_prune(model, ratio, torch.zeros(2, 4) if not isinstance(model[0] if isinstance(model, nn.Sequential) else model, nn.Conv2d) else torch.zeros(1, 4, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_magnitude_pruning_zeroes_the_requested_share():
    torch.manual_seed(0)
    model = digits_cnn()
    frac = magnitude_prune(model, 0.6)
    assert 0.59 <= frac <= 0.61
    with pytest.raises(PruneError):
        magnitude_prune(model, 0.0)


def test_distillation_loss_is_kl_scaled_by_t_squared_plus_hard_term():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    soft = (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    hard = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(distill_loss(s, t, y, 2.0, 0.25), 0.25 * soft + 0.75 * hard)
    torch.testing.assert_close(distill_loss(s, t, None, 2.0, 0.25), soft)
    assert float(distill_loss(t, t, None, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_training_resumes_from_its_checkpoint_exactly(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(96, 1, 8, 8), torch.randint(0, 10, (96,))
    teacher = digits_cnn().eval()

    def student():
        torch.manual_seed(3)
        return digits_cnn(width=4)

    straight = student()
    fit(straight, x, y, teacher=teacher, cfg=TrainConfig(epochs=4, batch_size=32, progress=False))
    part = student()
    r1 = fit(part, x, y, teacher=teacher, cfg=TrainConfig(epochs=2, batch_size=32, progress=False,
                                                          checkpoint_dir=tmp_path / "ck"))
    resumed = student()  # a fresh process would start from scratch; the checkpoint carries it on
    r2 = fit(resumed, x, y, teacher=teacher, cfg=TrainConfig(epochs=4, batch_size=32, progress=False,
                                                             checkpoint_dir=tmp_path / "ck"))
    assert (r1.epochs_run, r2.resumed_from, r2.epochs_run) == (2, 2, 2)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_student_spec_builds_and_names_bad_layers(tmp_path):
    spec = {"layers": [["conv2d", 4, 3, {"padding": 1}], ["relu"], ["maxpool2d", 2], ["flatten"], ["linear", 10]]}
    m = build_student(spec, EXAMPLE)
    assert m(torch.rand(3, 1, 8, 8)).shape == (3, 10) and param_count(m) == 4 * 9 + 4 + 64 * 10 + 10
    with pytest.raises(ValueError, match="layer 1 'lstm' is not one of"):
        build_student({"layers": [["linear", 3], ["lstm", 3]]}, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-empty 'layers'"):
        build_student({}, EXAMPLE)
