"""The compression report: every figure computed (sizes, parameters, interleaved latency, fidelity)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rtserve.compress.cli import main_for_tests
from rtserve.compress.output import resolve_output
from rtserve.compress.report import (CompressionReport, Latency, ModelStats, accuracy, cosine,
                                     count_onnx_params, format_report, mean_kl, measure_latency, model_stats,
                                     plot_versions, read_report, top1_agreement, write_report)


@pytest.fixture(scope="module")
def affine(tmp_path_factory) -> Path:
    from models import affine_module

    from rtserve.export.torch_export import export_onnx

    import torch

    return export_onnx(affine_module(), torch.zeros(2, 4), tmp_path_factory.mktemp("affine") / "model.onnx",
                       ["x"], ["y"])


def test_params_and_sizes_are_read_from_the_file(affine):
    import onnx
    from onnx import numpy_helper

    inits = [numpy_helper.to_array(i) for i in onnx.load(str(affine)).graph.initializer]
    assert count_onnx_params(affine) == sum(a.size for a in inits)
    weights = [a for a in inits if a.size >= 3]  # Linear(4, 3): weight 12 and bias 3 elements
    assert sorted(a.size for a in weights)[-2:] == [3, 12]
    s = model_stats(affine)
    assert s.file_bytes == affine.stat().st_size
    assert s.weight_bytes == sum(a.nbytes for a in inits)


class _Fake:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def run(self, outputs, feeds):
        self.calls.append((self.name, next(iter(feeds.values())).shape[0]))
        return [np.zeros(1)]


def test_latency_is_measured_interleaved_per_batch():
    calls: list = []
    sessions = {"a": _Fake("a", calls), "b": _Fake("b", calls)}
    lat = measure_latency(sessions, lambda b: {"x": np.zeros((b, 4))}, batches=(1, 8), repeats=4, warmup=1)
    assert [x.batch for x in lat["a"]] == [1, 8] and all(x.runs == 4 for x in lat["b"])
    assert all(x.p50_ms > 0 and x.p99_ms >= x.p50_ms for v in lat.values() for x in v)
    timed = calls[2:10]  # after 1 warm-up round at batch 1: the order rotates every round
    assert [n for n, _ in timed] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {b for _, b in calls[:10]} == {1} and {b for _, b in calls[10:]} == {8}


def test_fidelity_helpers():
    a = np.random.default_rng(0).standard_normal((5, 7))
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == pytest.approx(0.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert top1_agreement(a, a) == 1.0
    assert top1_agreement(np.array([[1, 0], [0, 1]]), np.array([[1, 0], [1, 0]])) == 0.5
    assert mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    assert mean_kl(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert accuracy(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 0, 0])) == pytest.approx(2 / 3)


def _stats(path: str, p50: float, acc: float) -> ModelStats:
    return ModelStats(path, 1000, 900, 100, [Latency(1, p50, p50 * 2, 10), Latency(8, 4 * p50, 5 * p50, 10)],
                      {"accuracy": acc, "cosine": 1.0})


def test_report_round_trip_table_and_plot(tmp_path):
    r = CompressionReport("int8-static", {"per_channel": True}, _stats("m/1/model.onnx", 1.0, 0.98),
                          _stats("m/2/model.onnx", 0.5, 0.975), {"cpu": "x", "threads": 1, "vnni": True},
                          notes=["calibration: 8 samples"])
    write_report(r, tmp_path / "report.json")
    back = read_report(tmp_path / "report.json")
    assert back == r
    text = format_report(back)
    assert "p50_b8_ms" in text and "97.50%" in text and "note: calibration: 8 samples" in text
    assert "2.00" in text  # speed_b1_x: 1.0 / 0.5, computed from the two latencies
    pytest.importorskip("matplotlib")
    png = plot_versions([r], tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_fields_are_computed(affine, tmp_path):
    x = np.random.default_rng(0).random((64, 4)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    out = tmp_path / "out"
    assert main_for_tests([str(affine), "--out", str(out), "--quantize", "int8-dynamic", "--eval-data",
                           str(tmp_path / "eval.npz"), "--max-batch", "16", "--repeats", "5",
                           "--plot", str(tmp_path / "v.png")]) == 0
    report = json.loads((out / "report.json").read_text())
    for side, path in (("source", affine), ("result", out / "model.onnx")):
        s = report[side]
        assert s["file_bytes"] == path.stat().st_size
        assert s["params"] == count_onnx_params(path)
        assert [lat["batch"] for lat in s["latency"]] == [1, 16]
        assert all(lat["p50_ms"] > 0 and lat["p99_ms"] >= lat["p50_ms"] for lat in s["latency"])
    assert report["source"]["fidelity"]["cosine"] == pytest.approx(1.0)  # the source against itself
    assert report["result"]["fidelity"]["cosine"] > 0.99
    assert "accuracy" not in report["result"]["fidelity"]  # no labels given
    assert report["machine"]["threads"] == 1 and "vnni" in report["machine"]
    assert (tmp_path / "v.png").is_file()


def test_resolve_output_kinds(tmp_path):
    file_target = resolve_output(tmp_path / "a" / "q.onnx", "model.onnx", create=False)
    assert file_target.path == tmp_path / "a" / "q.onnx" and file_target.version is None
    assert not (tmp_path / "a").exists()
    folder = resolve_output(tmp_path / "b", "model.onnx", create=False)
    assert folder.path == tmp_path / "b" / "model.onnx"
    (tmp_path / "m" / "7").mkdir(parents=True)
    (tmp_path / "m" / "model.yaml").write_text("backend: onnx\n")
    repo = resolve_output(tmp_path / "m", "model.onnx")
    assert repo.version == 8 and repo.path == tmp_path / "m" / "8" / "model.onnx"
    repo.work_path.write_bytes(b"x")
    assert not (tmp_path / "m" / "8").exists()  # nothing visible until commit
    repo.commit()
    assert (tmp_path / "m" / "8" / "model.onnx").read_bytes() == b"x"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["7", "8", "model.yaml"]
