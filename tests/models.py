"""Tiny real models for tests, built in temporary folders (never shipped)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# y = x @ W + b, exact in float32 for small integers
W = np.array([[1, 0, 2], [0, 1, 0], [1, 1, 1], [0, 0, 3]], dtype=np.float32)  # (4, 3)
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def affine_module():
    import torch

    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W.T))
        lin.bias.copy_(torch.from_numpy(B))
    return lin.eval()


def expected(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def write_model(repo: Path, name: str, backend: str, yaml_text: str, versions=(1,)) -> Path:
    """Write ``repo/name`` holding the affine model for ``backend`` ('onnx' | 'torch')."""
    import torch

    from rtserve.export.torch_export import export_onnx, export_pt2

    mdir = repo / name
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "model.yaml").write_text(yaml_text)
    ex = torch.zeros(2, 4)
    for v in versions:
        if backend == "onnx":
            export_onnx(affine_module(), ex, mdir / str(v) / "model.onnx", ["x"], ["y"])
        else:
            export_pt2(affine_module(), ex, mdir / str(v) / "model.pt2", ["x"], ["y"])
    return mdir


def write_slow_onnx(path: Path, width: int = 1024, depth: int = 150) -> Path:
    """An ONNX model y = tanh-chain of ``depth`` MatMuls on (B, width): slow enough to hold an
    instance busy (a batch of 64 rows takes about 0.2 s on one thread here), tiny on disk (one shared weight)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}" if i < depth - 1 else "y"]))
        prev = f"t{i}"
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


AFFINE_YAML = """\
backend: {backend}
device: cpu
max_batch_size: 8
batching:
  max_queue_delay_ms: 1
  max_queue_size: 64
  priority_levels: 2
backend_options:
  intra_op_threads: 1
"""

SLOW_YAML = """\
backend: onnx
device: cpu
max_batch_size: 64
batching:
  max_queue_size: {queue}
backend_options:
  intra_op_threads: 1
"""
