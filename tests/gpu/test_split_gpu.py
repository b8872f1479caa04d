"""A model too large for one process's GPU memory budget, served as 2 stages (each worker process
held to the same budget with ``memory_fraction``): the whole model refuses to load, the split one
serves the whole model's outputs. Skipped without CUDA."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from rtserve.split.serve import PipelineBackend  # noqa: E402
from rtserve.cli import main  # noqa: E402
from rtserve.errors import ConfigError  # noqa: E402
from rtserve.executors.process import ProcessInstance  # noqa: E402
from rtserve.export.torch_export import export_pt2  # noqa: E402

WIDTH, DEPTH = 4096, 16  # 16 x 64 MB = 1 GiB of fp32 weights


def test_model_over_one_process_budget_serves_as_two_stages(tmp_path):
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    for m in model:  # keep activations O(1) through 16 layers
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=WIDTH ** -0.5 * 1.4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    budget = 0.7 * weights / torch.cuda.get_device_properties(0).total_memory
    export_pt2(model, torch.zeros(2, WIDTH), tmp_path / "whole.pt2", ["x"], ["y"])

    with pytest.raises(ConfigError, match="do not fit"):  # whole, in a worker held to the budget
        ProcessInstance("torch", tmp_path / "whole.pt2", "cuda:0", {"memory_fraction": budget}, 1, None)

    out = tmp_path / "split"
    assert main(["split", str(tmp_path / "whole.pt2"), "--stages", "2", "--balance", "params", "--format", "pt2",
                 "--executor", "process", "--devices", "cuda:0", "--stage-options",
                 json.dumps({"memory_fraction": budget}), "--out", str(out)]) == 0
    pipe = PipelineBackend(out / "1" / "pipeline.json", "cuda:0", {}, 1)
    try:
        x = np.random.default_rng(0).standard_normal((24, WIDTH), dtype=np.float32)
        got = pipe.run({"x": x})["y"]
    finally:
        pipe.close()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * float(np.abs(want).max()))
