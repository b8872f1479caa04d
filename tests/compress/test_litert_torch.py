"""``rtserve convert --to tflite --via litert``: a spec model converted by Google's litert-torch in its
own environment (``make litert``), verified by the command, then run by rtserve's TFLite backend
with the PyTorch outputs. Skipped where that environment is missing (``RTSERVE_LITERT_PYTHON``,
default ``.venv-litert/bin/python``); ``make test`` creates it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtserve.cli import main
from rtserve.export.convert import ConversionError, convert, litert_python
from rtserve.spec.model import SpecModel, save_spec_model
from rtserve.demo import digits_cnn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _litert_env(monkeypatch):
    if "RTSERVE_LITERT_PYTHON" not in __import__("os").environ:
        monkeypatch.setenv("RTSERVE_LITERT_PYTHON", str(ROOT / ".venv-litert" / "bin" / "python"))
    if not litert_python().is_file():
        pytest.skip(f"no litert-torch environment at {litert_python()} (make litert)")


@pytest.mark.parametrize("batch", [1, 4])
def test_digits_cnn_to_tflite_through_litert_matches_torch(tmp_path, capsys, batch):
    from rtserve.backends.tflite import TFLiteBackend

    torch.manual_seed(0)
    model = digits_cnn().eval()
    save_spec_model(SpecModel(model, (1, 8, 8), "image", "logits"), tmp_path / "spec")
    out = tmp_path / "model.tflite"
    assert main(["convert", str(tmp_path / "spec"), "--to", "tflite", "--via", "litert", "--batch", str(batch),
                 "--out", str(out)]) == 0
    assert "verified on 3 input sets" in capsys.readouterr().out
    record = json.loads((tmp_path / "conversion.json").read_text())
    assert record["verification"]["max_abs_diff"] < 1e-4

    backend = TFLiteBackend(out, "cpu", {"num_threads": 1}, 1)
    assert [(s.name, s.shape) for s in backend.file_inputs] == [("image", (batch, 1, 8, 8))]
    x = np.random.default_rng(1).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.run({"image": x})["logits"], expected, atol=1e-4, rtol=0)


def test_litert_takes_layers_rtserves_writer_does_not(tmp_path):
    """BatchNorm and GELU are beyond rtserve's own writer; litert-torch converts them."""
    from rtserve.spec.layers import build_student

    torch.manual_seed(0)
    spec = {"layers": [["conv2d", 4, 3, {"padding": 1}], ["batchnorm2d"], ["gelu"], ["flatten"], ["linear", 3]]}
    model = build_student(spec, torch.zeros(2, 1, 8, 8)).eval()
    save_spec_model(SpecModel(model, (1, 8, 8), "image", "logits"), tmp_path / "spec")
    with pytest.raises(ConversionError):
        convert(tmp_path / "spec", "tflite", tmp_path / "own.tflite")
    r = convert(tmp_path / "spec", "tflite", tmp_path / "litert.tflite", via="litert", batch=2)
    assert r.verification.ok and r.verification.max_abs_diff < 1e-4


def test_bad_requests(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nope", "tflite", tmp_path / "m.tflite", via="litert")
    with pytest.raises(ConversionError, match="--via litert applies to --to tflite only"):
        convert(tmp_path, "onnx", tmp_path / "m.onnx", via="litert")
    save_spec_model(SpecModel(digits_cnn().eval(), (1, 8, 8), "image", "logits"), tmp_path / "spec")
    monkeypatch.setenv("RTSERVE_LITERT_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(ConversionError, match="make litert"):
        convert(tmp_path / "spec", "tflite", tmp_path / "m.tflite", via="litert")
