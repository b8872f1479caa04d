"""ONNX Runtime backend: CPU provider always, CUDA provider when present and asked for."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..tensors import TensorSpec
from .base import Backend, check_options, default_threads, register

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}


def _spec(arg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ConfigError(f"tensor '{arg.name}' has type {arg.type}, which rtserve does not serve")
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


@register
class OnnxBackend(Backend):
    name = "onnx"
    file_names = ("model.onnx",)
    OPTIONS = {"intra_op_threads", "inter_op_threads", "graph_optimization", "cuda_options", "allow_spinning"}

    def __init__(self, path: Path, device: str, options: dict, instances: int = 1,
                 output_names: list[str] | None = None) -> None:
        super().__init__(path, device, options, instances, output_names)
        import onnxruntime as ort

        check_options(self.name, options, self.OPTIONS)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(options.get("intra_op_threads", default_threads(instances)))
        so.inter_op_num_threads = int(options.get("inter_op_threads", 1))
        # Spinning worker threads burn a core while idle: on a small machine that core belongs to
        # the event loop, so rtserve turns spinning off unless asked.
        spin = "1" if options.get("allow_spinning", False) else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        level = options.get("graph_optimization", "all")
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if level not in levels:
            raise ConfigError(f"backend_options.graph_optimization: '{level}' is not one of {', '.join(levels)}")
        so.graph_optimization_level = levels[level]
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(f"device {device}: onnxruntime here has no CUDAExecutionProvider")
            cuda_opts = {"device_id": int(device.split(":")[1]) if ":" in device else 0}
            cuda_opts.update(options.get("cuda_options", {}))
            providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for bad files
            raise ConfigError(f"{path}: onnxruntime cannot load it: {e}") from None
        self.file_inputs = [_spec(a) for a in self.session.get_inputs()]
        self.file_outputs = [_spec(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.file_outputs]

    @classmethod
    def resolve_device(cls, device: str) -> str:
        if device != "auto":
            return device
        import onnxruntime as ort

        return "cuda:0" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results))
