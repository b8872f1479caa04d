"""LiteRT backend on .tflite files made by rtserve's own flatbuffer writer (no TensorFlow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rtserve.backends.base import get_backend
from rtserve.backends.tflite import TFLiteBackend
from rtserve.errors import ConfigError
from rtserve.export.tflite_writer import write_tflite
from rtserve.tensors import TensorSpec


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(dim=-1)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).eval()


def _check_batches(backend: TFLiteBackend, module: nn.Module, item_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    for batch in (1, 5, 3, 3):  # 3 twice: the second run takes the no-resize path
        x = rng.standard_normal((batch, *item_shape)).astype(np.float32)
        out = backend.run({"input": x})
        assert set(out) == {"output"}
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        assert out["output"].shape == expected.shape
        assert out["output"].dtype == np.float32
        np.testing.assert_allclose(out["output"], expected, atol=1e-5, rtol=0)


def test_registered_by_name():
    assert get_backend("tflite") is TFLiteBackend


def test_mlp_dynamic_batch(tmp_path):
    module = _mlp()
    path = write_tflite(module, torch.zeros(2, 4), tmp_path / "model.tflite")
    assert path == tmp_path / "model.tflite" and path.is_file()
    backend = TFLiteBackend(path, "cpu", {}, 1)
    assert backend.file_inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert backend.file_outputs == [TensorSpec("output", "FP32", (-1, 3))]
    _check_batches(backend, module, (4,))


def test_cnn_dynamic_batch(tmp_path):
    module = _cnn()
    path = write_tflite(module, torch.zeros(1, 1, 8, 8), tmp_path / "model.tflite")
    backend = TFLiteBackend(path, "cpu", {"num_threads": 1}, 1)
    assert backend.file_inputs == [TensorSpec("input", "FP32", (-1, 1, 8, 8))]
    assert backend.file_outputs == [TensorSpec("output", "FP32", (-1, 5))]
    _check_batches(backend, module, (1, 8, 8))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_padding_variants_and_nchw_output(tmp_path):
    # Explicit asymmetric-kernel padding (PAD + VALID), stride 2, dilation, 'same' with an even
    # kernel, ceil_mode pooling, and a 4-d output transposed back to NCHW.
    torch.manual_seed(2)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(1, 2)),
        nn.MaxPool2d(3, stride=1, padding=1), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 2, 4, padding="same"),
    ).eval()
    path = write_tflite(module, torch.zeros(1, 3, 11, 9), tmp_path / "m.tflite", "x", "y")
    backend = TFLiteBackend(path, "cpu", {}, 1)
    assert backend.file_inputs == [TensorSpec("x", "FP32", (-1, 3, 11, 9))]
    assert backend.file_outputs == [TensorSpec("y", "FP32", (-1, 2, 4, 3))]
    x = np.random.default_rng(1).standard_normal((2, 3, 11, 9)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.run({"x": x})["y"], expected, atol=1e-5, rtol=0)


def test_unsupported_layer_is_named(tmp_path):
    module = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8))
    with pytest.raises(ValueError, match="LSTM"):
        write_tflite(module, torch.zeros(1, 4), tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_unsupported_softmax_dim(tmp_path):
    with pytest.raises(ValueError, match="Softmax"):
        write_tflite(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=0)), torch.zeros(1, 4), tmp_path / "m.tflite")


def test_corrupt_file_is_config_error(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match="model.tflite"):
        TFLiteBackend(path, "cpu", {}, 1)


def test_unknown_option_is_config_error(tmp_path):
    path = write_tflite(_mlp(), torch.zeros(1, 4), tmp_path / "model.tflite")
    with pytest.raises(ConfigError, match="intra_op_threads"):
        TFLiteBackend(path, "cpu", {"intra_op_threads": 2}, 1)


def test_gpu_device_is_config_error(tmp_path):
    path = write_tflite(_mlp(), torch.zeros(1, 4), tmp_path / "model.tflite")
    with pytest.raises(ConfigError, match="cpu only"):
        TFLiteBackend(path, "cuda:0", {}, 1)
