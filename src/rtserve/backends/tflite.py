"""TensorFlow Lite / LiteRT backend (``ai-edge-litert``): ``.tflite`` flatbuffers.

A LiteRT interpreter holds fixed tensor shapes, so a batch whose size differs from the current one
resizes the inputs and re-allocates before running (cheap when the size repeats).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..tensors import TensorSpec, numpy_to_v2
from .base import Backend, check_options, default_threads, register


@register
class TFLiteBackend(Backend):
    name = "tflite"
    file_names = ("model.tflite",)
    OPTIONS = {"num_threads"}

    def __init__(self, path: Path, device: str, options: dict, instances: int = 1,
                 output_names: list[str] | None = None) -> None:
        super().__init__(path, device, options, instances, output_names)
        check_options(self.name, options, self.OPTIONS)
        if device != "cpu":
            raise ConfigError(f"device {device}: the tflite backend runs on cpu only")
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interp = Interpreter(
                model_path=str(path), num_threads=int(options.get("num_threads", default_threads(instances)))
            )
            self.interp.allocate_tensors()
        except Exception as e:
            raise ConfigError(f"{path}: LiteRT cannot load it: {e}") from None
        self._inputs = self.interp.get_input_details()
        self._outputs = self.interp.get_output_details()
        self.file_inputs = [self._spec(d) for d in self._inputs]
        self.file_outputs = [self._spec(d) for d in self._outputs]
        self._shapes = {d["index"]: tuple(d["shape"]) for d in self._inputs}

    @staticmethod
    def _spec(d: dict) -> TensorSpec:
        sig = d.get("shape_signature")
        shape = sig if sig is not None and len(sig) else d["shape"]
        return TensorSpec(d["name"], numpy_to_v2(np.dtype(d["dtype"])), tuple(int(x) if x > 0 else -1 for x in shape))

    @classmethod
    def resolve_device(cls, device: str) -> str:
        return "cpu" if device == "auto" else device

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        resized = False
        for d in self._inputs:
            arr = inputs[d["name"]]
            if self._shapes[d["index"]] != arr.shape:
                self.interp.resize_tensor_input(d["index"], list(arr.shape), strict=False)
                self._shapes[d["index"]] = arr.shape
                resized = True
        if resized:
            self.interp.allocate_tensors()
        for d in self._inputs:
            self.interp.set_tensor(d["index"], np.ascontiguousarray(inputs[d["name"]], dtype=d["dtype"]))
        self.interp.invoke()
        return {d["name"]: self.interp.get_tensor(d["index"]).copy() for d in self._outputs}
