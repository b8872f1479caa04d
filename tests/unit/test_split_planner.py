"""The split planner: balanced contiguous stages for known costs, FLOP counting, clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rtserve.split.planner import SplitError, layer_costs, partition, plan_split


@pytest.mark.parametrize("costs,n,expected", [
    ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
    ([5, 1, 1, 1, 1, 1], 2, [(0, 1), (1, 6)]),
    ([1, 2, 3, 4, 5, 6], 3, [(0, 3), (3, 5), (5, 6)]),   # sums 6, 9, 6: 9 is the best possible
    ([3, 3, 3], 3, [(0, 1), (1, 2), (2, 3)]),
])
def test_partition_minimises_the_largest_stage(costs, n, expected):
    assert partition(costs, n) == expected


def test_flops_and_params_are_counted_from_shapes():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    flops, shapes = layer_costs(m, torch.zeros(3, 2, 5, 5), "flops")
    assert flops[0] == 2 * (3 * 3 * 2) * (4 * 5 * 5) and flops[3] == 2 * 100 * 7
    assert shapes == [(4, 5, 5), (4, 5, 5), (100,), (7,)]
    params, _ = layer_costs(m, torch.zeros(3, 2, 5, 5), "params")
    assert params == [4 * 2 * 9 + 4, 0, 0, 100 * 7 + 7]


def test_plan_reports_what_crosses_each_cut():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    plan = plan_split(m, torch.zeros(4, 8), 2, "params")
    assert [s.layers for s in plan.stages] == [(0, 1), (1, 5)]  # 144 | 323 params beats 416 | 51
    assert plan.stages[0].output_shape == (16,) and plan.stages[0].output_bytes == 64
    assert "crosses to the next stage" in plan.table() and "64 B/sample" in plan.table()


@pytest.mark.parametrize("model,n,balance,needle", [
    (nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 3, "flops", "only 2 layers"),
    (nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 1, "flops", "at least 2"),
    (nn.Linear(2, 2), 2, "flops", "nn.Sequential"),
    (nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2, "memory", "is not one of"),
])
def test_bad_requests(model, n, balance, needle):
    with pytest.raises(SplitError, match=needle):
        plan_split(model, torch.zeros(1, 2), n, balance)
