"""``rtserve split`` on a torch.export graph: cuts where only tensors (or recomputable sizes) cross,
balanced by cost, the fewest bytes among near-equal balances; several tensors per cut; stages
chained by the pipeline backend compute exactly what the whole program does."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from rtserve.split.serve import PipelineBackend
from rtserve.cli import main
from rtserve.export.torch_export import export_pt2
from rtserve.split.graph import GraphSplitter
from rtserve.split.planner import SplitError, partition


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class Residual(nn.Module):
    """Two inputs (features, mask), two outputs: pooled logits and an early summary that crosses
    every cut; the batch size is read at the start and used at the end (a size crossing cuts)."""

    def __init__(self, d: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x, mask):
        n = x.shape[0]
        h = self.emb(x) * mask.unsqueeze(-1)
        early = h.mean(-1)
        for b in self.blocks:
            h = b(h)
        return self.head(h).sum(1).reshape(n, -1), early


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    torch.manual_seed(0)
    model = Residual().eval()
    path = tmp_path_factory.mktemp("prog") / "model.pt2"
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(model, (torch.randn(3, 5, 8), torch.ones(3, 5)),
                             dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    from rtserve.backends.torch import META_FILE

    torch.export.save(ep, str(path), extra_files={META_FILE: json.dumps({"inputs": ["features", "mask"],
                                                                         "outputs": ["logits", "summary"]})})
    return path, model


def splitter(path):
    from rtserve.export.convert import pt2_meta

    ep, ins, outs = pt2_meta(path)
    return GraphSplitter(ep, ins, outs)


def test_partition_respects_valid_cuts_and_prefers_fewer_bytes():
    costs = [1, 1, 1, 1]
    assert partition(costs, 2) == [(0, 2), (2, 4)]
    no_middle = np.array([True, True, False, True, True])
    assert partition(costs, 2, no_middle) == [(0, 1), (1, 4)]
    cheap_first = np.array([0, 1, 100, 100, 0.0])
    assert partition(costs, 2, None, cheap_first) == [(0, 2), (2, 4)]          # balance first
    assert partition(costs, 2, None, cheap_first, 0.5) == [(0, 1), (1, 4)]     # 3 <= 2 * 1.5: bytes win
    with pytest.raises(SplitError, match="too few places"):
        partition(costs, 3, np.array([True, False, False, True, True]))


def test_plan_cuts_between_blocks_and_names_every_crossing_tensor(program):
    path, model = program
    sp = splitter(path)
    plan = sp.plan(2, "params")
    total = sum(p.numel() for p in model.parameters())
    assert sum(s.params for s in plan.stages) == total
    assert sum(s.cost for s in plan.stages) == pytest.approx(total)
    first, second = plan.stages
    # emb + blocks.0-1 | blocks.2-3 + head: the residual stream and the early summary cross
    assert first.modules == "emb .. blocks.1" and second.modules == "blocks.2 .. head"
    crossing = {c.name: c for c in first.crossing}
    assert set(crossing) == {"summary", *[n for n in first.outputs if n != "summary"]} and len(crossing) == 2
    hidden = next(c for n, c in crossing.items() if n != "summary")
    assert hidden.dtype == "float32" and hidden.shape[-1] == "16" and hidden.bytes_per_sample == 8 * 16 * 4
    assert crossing["summary"].bytes_per_sample == 8 * 4
    assert "summary" in first.outputs  # made early, handed on to the end
    assert second.inputs == (hidden.name,) and second.outputs == ("logits",)
    assert "blocks.2 .. head" in plan.table() and "512 B/sample" in plan.table()


@pytest.mark.parametrize("balance", ["flops", "latency"])
def test_every_balance_gives_a_plan(program, balance):
    plan = splitter(program[0]).plan(3, balance)
    assert len(plan.stages) == 3 and all(s.cost > 0 for s in plan.stages)
    assert plan.stages[0].ops[0] == 0 and plan.stages[-1].ops[1] == plan.n_ops
    assert all(a.ops[1] == b.ops[0] for a, b in zip(plan.stages, plan.stages[1:]))


@pytest.mark.parametrize("fmt,executor", [("pt2", "local"), ("onnx", "process")])
def test_split_program_serves_the_whole_programs_outputs(program, tmp_path, capsys, fmt, executor):
    path, model = program
    out = tmp_path / "split"
    assert main(["split", str(path), "--stages", "3", "--balance", "flops", "--format", fmt,
                 "--executor", executor, "--micro-batch", "3", "--out", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    spec = json.loads((out / "1" / "pipeline.json").read_text())
    assert spec["inputs"] == ["features", "mask"] and spec["outputs"] == ["logits", "summary"]
    assert any(len(s["inputs"]) > 1 or len(s["outputs"]) > 1 for s in spec["stages"])
    pipe = PipelineBackend(out / "1" / "pipeline.json", "cpu", {}, 1)
    try:
        assert [s.name for s in pipe.file_inputs] == ["features", "mask"]
        assert [(s.name, s.datatype) for s in pipe.file_outputs] == [("logits", "FP32"), ("summary", "FP32")]
        rng = np.random.default_rng(3)
        for batch, seq in ((1, 2), (7, 11)):
            x = rng.standard_normal((batch, seq, 8), dtype=np.float32)
            m = (rng.random((batch, seq)) > 0.3).astype(np.float32)
            got = pipe.run({"features": x, "mask": m})
            with torch.no_grad():
                logits, summary = model(torch.from_numpy(x), torch.from_numpy(m))
            np.testing.assert_allclose(got["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["summary"], summary.numpy(), rtol=1e-5, atol=1e-6)
    finally:
        pipe.close()


def test_a_program_without_a_dynamic_batch_is_refused(tmp_path):
    export = torch.export.export(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(),
                                 (torch.zeros(2, 4),))
    with pytest.raises(SplitError, match="input 'x' has no dynamic batch axis"):
        GraphSplitter(export, ["x"], ["y"])


def test_bad_requests_before_anything_is_written(program, tmp_path, capsys):
    path, _ = program
    sp = splitter(path)
    with pytest.raises(SplitError, match="only"):
        sp.plan(10_000)
    with pytest.raises(SplitError, match="is not one of"):
        sp.plan(2, "memory")
    assert main(["split", str(tmp_path / "missing.pt2"), "--stages", "2", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    for flags, needle in ((["--devices", "cpu,cpu,cpu"], "3 devices for 2 stages"),
                          (["--devices", "gpu0"], "not cpu or cuda:N"), (["--in-flight", "0"], ">= 1"),
                          (["--stage-options", "{memory"], "not JSON"), (["--stage-options", "[1]"], "JSON object")):
        assert main(["split", str(path), "--stages", "2", "--out", str(tmp_path / "o"), *flags]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_devices_and_in_flight_are_written_after_verification(program, tmp_path):
    out = tmp_path / "s"
    assert main(["split", str(program[0]), "--stages", "2", "--format", "pt2", "--executor", "local",
                 "--devices", "cpu,cuda:1", "--in-flight", "3", "--stage-options", '{"memory_fraction": 0.5}',
                 "--out", str(out)]) == 0
    spec = json.loads((out / "1" / "pipeline.json").read_text())
    assert [s["device"] for s in spec["stages"]] == ["cpu", "cuda:1"] and spec["in_flight"] == 3
    assert all(s["options"] == {"memory_fraction": 0.5} for s in spec["stages"])


def test_sequential_exported_by_rtserve_splits_like_its_layers(tmp_path):
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    export_pt2(chain, torch.zeros(2, 8), tmp_path / "c.pt2", ["x"], ["y"])
    plan = splitter(tmp_path / "c.pt2").plan(2, "params")
    assert [len(s.crossing) for s in plan.stages] == [1, 0]  # a chain hands over one tensor


class SliceWrite(nn.Module):
    """In-place writes through views (``buf[:, :, 8:] = ...``, ``add_``): a cut between a view and
    a write into it must not hand the next stage a stale copy."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 4)

    def forward(self, x):
        buf = torch.zeros(x.shape[0], x.shape[1], 16)
        view = buf[:, :, 8:]
        buf[:, :, :8] = torch.relu(self.a(x))
        view.copy_(self.b(x))
        view.add_(1.0)
        return self.c(buf).mean(1) + x.shape[1]  # the sequence length, read at the start, used at the end


def _export_auto(model, example, path):
    with torch.no_grad():
        ep = torch.export.export(model, example, dynamic_shapes=tuple({0: torch.export.Dim.AUTO,
                                                                      1: torch.export.Dim.AUTO} for _ in example))
    torch.export.save(ep, str(path))
    return path


def test_in_place_writes_unbounded_dims_and_sizes_read_early(tmp_path):
    torch.manual_seed(0)
    model = SliceWrite().eval()
    path = _export_auto(model, (torch.randn(3, 5, 8),), tmp_path / "m.pt2")  # Dim.AUTO: no upper bound
    plan = splitter(path).plan(3, "flops")
    assert all(s.outputs for s in plan.stages)  # no stage of size reads only
    out = tmp_path / "split"
    assert main(["split", str(path), "--stages", "3", "--format", "pt2", "--executor", "process",
                 "--out", str(out)]) == 0
    pipe = PipelineBackend(out / "1" / "pipeline.json", "cpu", {}, 1)
    try:
        x = np.random.default_rng(0).standard_normal((11, 7, 8), dtype=np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(pipe.run({"input_0": x})["output_0"], want, rtol=1e-5, atol=1e-5)
    finally:
        pipe.close()


def test_programs_that_cannot_be_split_say_why(tmp_path):
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.l(self.l(x))

    class ReturnsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(x), self.l.weight

    u = _export_auto(Unused().eval(), (torch.zeros(3, 4), torch.zeros(3, 4)), tmp_path / "u.pt2")
    with pytest.raises(SplitError, match="input 'input_1' is not used"):
        splitter(u)
    w = _export_auto(ReturnsWeight().eval(), (torch.zeros(3, 4),), tmp_path / "w.pt2")
    with pytest.raises(SplitError, match="not an input or a weight"):
        splitter(w)


def test_close_lets_batches_in_flight_finish(program, tmp_path):
    import threading

    out = tmp_path / "s"
    assert main(["split", str(program[0]), "--stages", "3", "--format", "pt2", "--executor", "local",
                 "--micro-batch", "1", "--out", str(out)]) == 0
    pipe = PipelineBackend(out / "1" / "pipeline.json", "cpu", {}, 1)
    x = np.random.default_rng(0).standard_normal((400, 16, 8), dtype=np.float32)
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(pipe.run({"features": x, "mask": np.ones((400, 16), np.float32)})))
    t.start()
    deadline = time.monotonic() + 30
    while pipe.num_accepted < 1 and time.monotonic() < deadline:  # the batch is in the pipeline
        time.sleep(0.001)
    pipe.close()
    t.join(30)
    assert not t.is_alive() and got["logits"].shape == (400, 3)
    from rtserve.errors import Unavailable

    with pytest.raises(Unavailable):
        pipe.run({"features": x[:1], "mask": np.ones((1, 16), np.float32)})
