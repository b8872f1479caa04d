"""int8 quantization with ONNX Runtime: accuracy of the digits CNN, size of a dynamic MLP, the
repository version folder, and bad input rejected before anything is written."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from rtserve.compress import CompressError
from rtserve.compress.cli import add_compress_parser, main_for_tests, prepare, run_job
from rtserve.compress.onnx_quant import (CalibrationData, has_vnni, model_inputs, plan_quantization,
                                         quantize_onnx)
from rtserve.compress.report import accuracy, compare_outputs, onnx_weights


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo digits CNN, trained (~2-10 s) and exported to fp32 ONNX; with its data split."""
    import torch

    from rtserve.demo import digits_data, train_digits
    from rtserve.export.torch_export import export_onnx

    model, _ = train_digits()
    path = export_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path_factory.mktemp("digits") / "model.onnx",
                       ["image"], ["logits"])
    return path, digits_data()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    """A float MLP (random weights, 64 -> 256 -> 256 -> 10): almost all of it is MatMul weights."""
    import torch

    from rtserve.export.torch_export import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return export_onnx(net, torch.zeros(2, 64), tmp_path_factory.mktemp("mlp") / "model.onnx", ["x"], ["y"])


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_compress_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["compress", *argv])


@pytest.mark.parametrize("reduce_range", [None, True], ids=["auto", "7-bit-weights-no-vnni"])
def test_static_int8_digits_keeps_accuracy_within_half_a_point(digits, tmp_path, reduce_range):
    path, (xtr, _, xte, yte) = digits
    calib = CalibrationData({"image": xtr[:256]}, "file:train[:256]")
    recipe = quantize_onnx(path, tmp_path / "int8.onnx", "int8-static", calib, reduce_range=reduce_range)
    fp32 = accuracy(_session(path).run(None, {"image": xte})[0], yte)
    int8 = accuracy(_session(tmp_path / "int8.onnx").run(None, {"image": xte})[0], yte)
    assert fp32 > 0.95
    assert abs(fp32 - int8) <= 0.005, (fp32, int8)
    assert recipe["format"] == "QDQ" and recipe["per_channel"] and recipe["calibration"]["samples"] == 256
    assert recipe["reduce_range"] == (not has_vnni() if reduce_range is None else reduce_range)
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_dynamic_int8_mlp_is_3x_smaller_and_close(mlp, tmp_path):
    recipe = quantize_onnx(mlp, tmp_path / "int8.onnx", "int8-dynamic")
    _, fp32_bytes = onnx_weights(mlp)
    _, int8_bytes = onnx_weights(tmp_path / "int8.onnx")
    assert fp32_bytes / int8_bytes >= 3.0, (fp32_bytes, int8_bytes)
    x = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    ref = _session(mlp).run(None, {"x": x})[0]
    got = _session(tmp_path / "int8.onnx").run(None, {"x": x})[0]
    fid = compare_outputs(ref, got)
    assert fid["cosine"] > 0.995 and fid["top1_agreement"] >= 0.95, fid
    assert "Conv" not in recipe["op_types"] and "MatMul" in recipe["op_types"]


def test_vnni_detection_and_saturation_safe_setting(mlp):
    assert has_vnni("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert has_vnni("flags\t\t: fpu avx2 avx_vnni\n")
    assert not has_vnni("flags\t\t: fpu sse avx2 avx512f\n")
    without = plan_quantization(mlp, "int8-dynamic", vnni=False)
    assert without.reduce_range and "saturate" in without.reduce_range_reason
    assert not plan_quantization(mlp, "int8-dynamic", vnni=True).reduce_range


def test_repository_destination_gets_the_next_version(mlp, tmp_path):
    model_dir = tmp_path / "repo" / "mlp"
    for v in (1, 2):
        (model_dir / str(v)).mkdir(parents=True)
        (model_dir / str(v) / "model.onnx").write_bytes(mlp.read_bytes())
    yaml_text = "backend: onnx\nmax_batch_size: 8\n"
    (model_dir / "model.yaml").write_text(yaml_text)
    assert main_for_tests([str(model_dir), "--out", str(model_dir), "--quantize", "int8-dynamic",
                           "--repeats", "5", "--eval-samples", "16"]) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "3", "model.yaml"]  # no temp folder left
    assert (model_dir / "3" / "model.onnx").is_file()
    report = json.loads((model_dir / "3" / "report.json").read_text())
    assert report["source"]["path"] == str(model_dir / "2" / "model.onnx")
    assert report["result"]["path"] == str(model_dir / "3" / "model.onnx")
    assert [lat["batch"] for lat in report["result"]["latency"]] == [1, 8]  # model.yaml's max batch
    assert (model_dir / "model.yaml").read_text() == yaml_text


def test_a_failure_during_the_work_leaves_no_version(mlp, tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    (model_dir / "model.yaml").write_text("backend: onnx\n")
    job = prepare(_args([str(model_dir), "--out", str(model_dir), "--quantize", "int8-dynamic"]))

    def boom(*a, **k):
        raise RuntimeError("measurement failed")

    monkeypatch.setattr("rtserve.compress.onnx_job.measure", boom)
    with pytest.raises(RuntimeError):
        run_job(job)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "model.yaml"]


def _bad_cases(tmp: Path, mlp: Path) -> dict[str, tuple[list[str], str]]:
    x = np.zeros((4, 64), np.float32)
    np.savez(tmp / "wrong_name.npz", image=x)
    np.savez(tmp / "wrong_dtype.npz", x=x.astype(np.float64))
    np.savez(tmp / "wrong_shape.npz", x=np.zeros((4, 32), np.float32))
    np.savez(tmp / "bad_labels.npz", x=x, labels=np.zeros(3, np.int64))
    np.savez(tmp / "good.npz", x=x)
    out = ["--out", str(tmp / "out" / "q.onnx")]
    s = [str(mlp), *out]
    return {
        "unknown method": ([*s, "--quantize", "int4"], "not one of int8-dynamic, int8-static"),
        "missing source": ([str(tmp / "nope.onnx"), *out, "--quantize", "int8-dynamic"], "does not exist"),
        "static without calibration": ([*s, "--quantize", "int8-static"], "needs calibration data"),
        "missing calibration file": ([*s, "--quantize", "int8-static", "--calibration", str(tmp / "none.npz")],
                                     "does not exist"),
        "calibration input name": ([*s, "--quantize", "int8-static", "--calibration", str(tmp / "wrong_name.npz")],
                                   "unknown input(s) ['image']"),
        "calibration dtype": ([*s, "--quantize", "int8-static", "--calibration", str(tmp / "wrong_dtype.npz")],
                              "dtype float64"),
        "calibration shape": ([*s, "--quantize", "int8-static", "--calibration", str(tmp / "wrong_shape.npz")],
                              "shape [4, 32]"),
        "both calibration kinds": ([*s, "--quantize", "int8-static", "--calibration", str(tmp / "good.npz"),
                                    "--calibration-samples", "8"], "not both"),
        "dynamic with calibration": ([*s, "--quantize", "int8-dynamic", "--calibration-samples", "8"],
                                     "takes no calibration"),
        "zero samples": ([*s, "--quantize", "int8-static", "--calibration-samples", "0"], "at least 1"),
        "bad max batch": ([*s, "--quantize", "int8-dynamic", "--max-batch", "0"], "--max-batch"),
        "eval labels": ([*s, "--quantize", "int8-dynamic", "--eval-data", str(tmp / "bad_labels.npz")],
                        "'labels' must be 4"),
        "plot suffix": ([*s, "--quantize", "int8-dynamic", "--plot", str(tmp / "p.jpg")], ".png"),
    }


@pytest.mark.parametrize("case", ["unknown method", "missing source", "static without calibration",
                                  "missing calibration file", "calibration input name", "calibration dtype",
                                  "calibration shape", "both calibration kinds", "dynamic with calibration",
                                  "zero samples", "bad max batch", "eval labels", "plot suffix"])
def test_bad_input_is_a_clear_error_before_any_work(case, mlp, tmp_path, capsys):
    argv, message = _bad_cases(tmp_path, mlp)[case]
    with pytest.raises(CompressError, match=None) as e:
        prepare(_args(argv))
    assert message in str(e.value)
    assert main_for_tests(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generated_calibration_is_recorded_as_weaker(digits, tmp_path):
    path, _ = digits
    assert main_for_tests([str(path), "--out", str(tmp_path / "q"), "--quantize", "int8-static",
                           "--calibration-samples", "32", "--repeats", "3", "--eval-samples", "32"]) == 0
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["recipe"]["calibration"]["source"] == "generated"
    assert "weaker than real data" in report["recipe"]["calibration"]["note"]
    assert any("weaker than real data" in n for n in report["notes"])
    assert (tmp_path / "q" / "model.onnx").is_file()
    assert [i.name for i in model_inputs(tmp_path / "q" / "model.onnx")] == ["image"]
