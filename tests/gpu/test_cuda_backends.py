"""CUDA paths of the backends. Skipped where there is no CUDA (this machine, CI); run on a GPU box."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from models import AFFINE_YAML, expected, write_model  # noqa: E402


def test_torch_backend_on_cuda(tmp_path):
    from rtserve.backends.torch import TorchBackend

    mdir = write_model(tmp_path, "a", "torch", AFFINE_YAML.format(backend="torch"))
    assert TorchBackend.resolve_device("auto") == "cuda:0"
    b = TorchBackend(mdir / "1" / "model.pt2", "cuda:0", {}, 1)
    x = np.random.rand(5, 4).astype(np.float32)
    np.testing.assert_allclose(b.run({"x": x})["y"], expected(x), rtol=1e-4, atol=1e-4)


def test_onnx_backend_on_cuda_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider")
    from rtserve.backends.onnx import OnnxBackend

    mdir = write_model(tmp_path, "a", "onnx", AFFINE_YAML.format(backend="onnx"))
    b = OnnxBackend(mdir / "1" / "model.onnx", "cuda:0", {}, 1)
    assert b.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.rand(5, 4).astype(np.float32)
    np.testing.assert_allclose(b.run({"x": x})["y"], expected(x), rtol=1e-4, atol=1e-4)
