"""PyTorch backend: ``torch.export`` programs saved as ``.pt2``, loaded with ``torch.export.load``.

No pickle is ever loaded. Output names come from an ``rtserve.json`` extra file written by our
exporter, else from model.yaml, else ``output_0``, ``output_1``, ... Options: ``intra_op_threads``
(CPU), ``memory_fraction`` (CUDA: this process's share of the device; weights beyond it fail to load
with a clear error -- how a pipeline stage worker is held to a memory budget).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..tensors import TensorSpec, numpy_to_v2
from .base import Backend, check_options, default_threads, register

META_FILE = "rtserve.json"


def _static_dims(val) -> tuple[int, ...]:
    out = []
    for d in val.shape:
        try:
            out.append(int(d) if type(d) is int else -1)
        except TypeError:
            out.append(-1)
    return tuple(out)


@register
class TorchBackend(Backend):
    name = "torch"
    file_names = ("model.pt2",)
    OPTIONS = {"intra_op_threads", "memory_fraction"}

    def __init__(self, path: Path, device: str, options: dict, instances: int = 1,
                 output_names: list[str] | None = None) -> None:
        super().__init__(path, device, options, instances, output_names)
        import torch

        check_options(self.name, options, self.OPTIONS)
        if device == "cpu":
            torch.set_num_threads(int(options.get("intra_op_threads", default_threads(instances))))
        budget = options.get("memory_fraction")
        if budget is not None and device.startswith("cuda"):
            # this process's share of the GPU (a stage worker's memory budget); allocations past it fail
            if not 0 < float(budget) <= 1:
                raise ConfigError(f"memory_fraction {budget} is not in (0, 1]")
            torch.cuda.set_per_process_memory_fraction(float(budget), torch.device(device))
        extra = {META_FILE: ""}
        try:
            ep = torch.export.load(str(path), extra_files=extra)
        except Exception as e:
            raise ConfigError(f"{path}: torch.export.load cannot load it: {e}") from None
        meta = json.loads(extra[META_FILE]) if extra.get(META_FILE) else {}
        sig = ep.graph_signature
        user_inputs = list(sig.user_inputs)
        in_names = meta.get("inputs") or user_inputs
        vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        out_node = next(n for n in ep.graph.nodes if n.op == "output")
        out_vals = [a.meta.get("val") for a in out_node.args[0]]
        out_names = meta.get("outputs") or output_names or [f"output_{i}" for i in range(len(out_vals))]
        if len(out_names) != len(out_vals):
            raise ConfigError(f"{path}: the program has {len(out_vals)} outputs, config names {len(out_names)}")
        self.file_inputs = [self._spec(n, vals[u]) for n, u in zip(in_names, user_inputs)]
        self.file_outputs = [self._spec(n, v) for n, v in zip(out_names, out_vals)]
        self._torch = torch
        self._device = torch.device(device)
        try:
            self.module = ep.module().to(self._device)
        except torch.OutOfMemoryError:
            raise ConfigError(f"{path}: the weights do not fit on {device}"
                              + (f" within memory_fraction {budget}" if budget is not None else "")) from None
        self._in_names = in_names
        self._out_names = out_names

    @staticmethod
    def _spec(name: str, val) -> TensorSpec:
        import torch

        np_dtype = torch.empty((), dtype=val.dtype).numpy().dtype
        return TensorSpec(name, numpy_to_v2(np_dtype), _static_dims(val))

    @classmethod
    def resolve_device(cls, device: str) -> str:
        if device != "auto":
            return device
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(inputs[n]).to(self._device, non_blocking=True) for n in self._in_names]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: t.detach().to("cpu").numpy() for n, t in zip(self._out_names, out)}
