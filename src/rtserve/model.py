"""A loaded model version: backend instances, reconciled tensor specs, its batcher, labels."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends.base import Backend, get_backend
from .batching import DynamicBatcher, InferRequest
from .config import ModelConfig
from .errors import ConfigError, InvalidInput
from .metrics import ModelMetrics
from .tensors import TensorSpec

PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_export", "tflite": "tflite"}
LABEL_OUTPUT = "label"


def _reconcile(kind: str, given: tuple[TensorSpec, ...] | None, from_file: list[TensorSpec],
               batched: bool, where: str) -> list[TensorSpec]:
    """Specs without the batch dim; config specs are checked against the file's."""
    file_specs = []
    for s in from_file:
        shape = s.shape
        if batched:
            if not shape:
                raise ConfigError(f"{where}: {kind} '{s.name}' is a scalar, so max_batch_size must be 0")
            if shape[0] != -1:
                raise ConfigError(
                    f"{where}: {kind} '{s.name}' has a fixed batch dimension {shape[0]} in the model file; "
                    "export it with a dynamic batch axis or set max_batch_size: 0")
            shape = shape[1:]
        file_specs.append(TensorSpec(s.name, s.datatype, shape))
    if given is None:
        return file_specs
    by_name = {s.name: s for s in file_specs}
    if {g.name for g in given} != set(by_name):
        raise ConfigError(
            f"{where}: {kind}s {sorted(g.name for g in given)} in model.yaml differ from the model file's "
            f"{sorted(by_name)}")
    out = []
    for g in given:
        f = by_name[g.name]
        if g.datatype != f.datatype:
            raise ConfigError(f"{where}: {kind} '{g.name}' is {f.datatype} in the model file, model.yaml says {g.datatype}")
        if len(g.shape) != len(f.shape) or any(fd != -1 and gd != fd for gd, fd in zip(g.shape, f.shape)):
            raise ConfigError(
                f"{where}: {kind} '{g.name}' has shape {list(f.shape)} in the model file, model.yaml says {list(g.shape)}"
                + (" (shapes in model.yaml exclude the batch dimension)" if batched else ""))
        out.append(g)
    return out


@dataclass
class VersionFiles:
    model_dir: Path
    version: int
    path: Path


class LoadedModel:
    """One served model version. ``infer`` validates and queues; the batcher runs."""

    def __init__(self, config: ModelConfig, files: VersionFiles, metrics: ModelMetrics | None = None) -> None:
        self.config = config
        self.name = config.name
        self.version = files.version
        self.path = files.path
        backend_cls: type[Backend] = get_backend(config.backend)
        self.device = backend_cls.resolve_device(config.device)
        out_names = [o.name for o in config.outputs] if config.outputs else None
        where = f"model '{self.name}' version {self.version} ({files.path})"
        self.instances: list[Backend] = []
        group = None
        if config.executor == "ray":  # one placement group for the version's instances
            from .executors.ray_executor import PlacementGroup

            group = PlacementGroup(config.instances, config.executor_options)
        for i in range(config.instances):
            if config.executor == "ray":
                from .executors.ray_executor import RayInstance

                self.instances.append(RayInstance(config.backend, files.path, self.device, config.backend_options,
                                                  config.instances, out_names, i, group))
            elif config.executor == "process":  # same interface (run, file specs, close), in a worker
                from .executors.process import ProcessInstance

                self.instances.append(ProcessInstance(config.backend, files.path, self.device, config.backend_options,
                                                      config.instances, out_names, i))
            else:
                self.instances.append(backend_cls(files.path, self.device, config.backend_options,
                                                  config.instances, out_names))
        first = self.instances[0]
        self.batched = config.max_batch_size > 0
        self.inputs = _reconcile("input", config.inputs, first.file_inputs, self.batched, where)
        self.outputs = _reconcile("output", config.outputs, first.file_outputs, self.batched, where)
        self.input_by_name = {s.name: s for s in self.inputs}
        self.labels = self._read_labels(files.model_dir, where)
        if config.warmup:
            self._warmup(where)
        self.metrics = metrics
        runners = [b.run for b in self.instances for _ in range(getattr(b, "in_flight", 1))]
        self.batcher = DynamicBatcher(self.name, runners, config.max_batch_size, config.batching, metrics)

    def _read_labels(self, model_dir: Path, where: str) -> list[str] | None:
        if not self.config.labels:
            return None
        p = model_dir / self.config.labels
        try:
            return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as e:
            raise ConfigError(f"{where}: labels file {p} cannot be read: {e.strerror}") from None

    def _warmup(self, where: str) -> None:
        if any(-1 in s.shape for s in self.inputs) or any(s.datatype == "BYTES" for s in self.inputs):
            return
        lead = [1] if self.batched else []
        feeds = {s.name: np.zeros(lead + list(s.shape), dtype=s.dtype) for s in self.inputs}
        for inst in self.instances:
            try:
                inst.run(feeds)
            except Exception as e:
                raise ConfigError(f"{where}: warm-up run failed: {type(e).__name__}: {e}") from None

    kind = "tensor"

    def start(self) -> None:
        self.batcher.start()

    @property
    def all_outputs(self) -> list[TensorSpec]:
        outs = list(self.outputs)
        if self.labels is not None:
            outs.append(TensorSpec(LABEL_OUTPUT, "BYTES", ()))
        return outs

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": PLATFORMS.get(self.config.backend, self.config.backend),
            "inputs": [s.to_json(self.batched) for s in self.inputs],
            "outputs": [s.to_json(self.batched) for s in self.all_outputs],
        }

    def config_json(self) -> dict:
        c = self.config
        return {
            "name": c.name, "backend": c.backend, "platform": PLATFORMS.get(c.backend, c.backend),
            "device": self.device, "instances": c.instances, "max_batch_size": c.max_batch_size,
            "dynamic_batching": {
                "max_queue_delay_ms": c.batching.max_queue_delay_ms,
                "preferred_batch_size": list(c.batching.preferred_batch_sizes),
                "max_queue_size": c.batching.max_queue_size,
                "priority_levels": c.batching.priority_levels,
                "default_priority_level": c.batching.default_priority,
                "default_timeout_ms": c.batching.default_timeout_ms,
            },
            "input": [s.to_json(self.batched) for s in self.inputs],
            "output": [s.to_json(self.batched) for s in self.all_outputs],
        }

    def make_request(self, inputs: dict[str, np.ndarray], priority: int | None = None,
                     timeout_s: float | None = None) -> InferRequest:
        """Validate names, datatypes and shapes and build the queued request."""
        batch = None
        for name, arr in inputs.items():
            spec = self.input_by_name.get(name)
            if spec is None:
                raise InvalidInput(f"model '{self.name}': unknown input '{name}'; "
                                   f"expected {sorted(self.input_by_name)}")
            if arr.dtype != spec.dtype and not (spec.datatype == "BYTES" and arr.dtype == object):
                raise InvalidInput(f"model '{self.name}': input '{name}' must be {spec.datatype}")
            spec.check(arr.shape, self.batched)
            if self.batched:
                if batch is None:
                    batch = arr.shape[0]
                elif arr.shape[0] != batch:
                    raise InvalidInput(f"model '{self.name}': inputs disagree on the batch size "
                                       f"({batch} vs {arr.shape[0]} for '{name}')")
        missing = [n for n in self.input_by_name if n not in inputs]
        if missing:
            raise InvalidInput(f"model '{self.name}': missing input '{missing[0]}'; "
                               f"expected {sorted(self.input_by_name)}")
        if self.batched and batch == 0:
            raise InvalidInput(f"model '{self.name}': batch size must be at least 1")
        return InferRequest(
            inputs=inputs, batch_size=batch or 1,
            priority=self.config.batching.default_priority if priority is None else priority,
            timeout_s=timeout_s)

    def postprocess(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.labels is None:
            return outputs
        scores = outputs[self.outputs[0].name]
        if scores.ndim >= 1:
            idx = scores.reshape(scores.shape[0] if self.batched else 1, -1).argmax(axis=1)
            labels = np.array([self._label(int(i)).encode() for i in idx], dtype=object)
            outputs = dict(outputs)
            outputs[LABEL_OUTPUT] = labels if self.batched else labels.reshape(())
        return outputs

    def _label(self, i: int) -> str:
        return self.labels[i] if self.labels and i < len(self.labels) else str(i)

    async def infer(self, inputs: dict[str, np.ndarray], priority: int | None = None,
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        req = self.make_request(inputs, priority, timeout_s)
        out = await self.batcher.submit(req)
        return self.postprocess(out)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        await self.batcher.drain(drain_timeout_s)
        await self.batcher.close()
        await asyncio.to_thread(self._close_instances)

    def _close_instances(self) -> None:
        for inst in self.instances:
            inst.close()
