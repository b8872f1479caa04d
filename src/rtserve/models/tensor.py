"""The ``tensor`` kind: a model file run by a backend (ONNX Runtime, PyTorch, LiteRT, a split
pipeline) on instances made by an executor, behind a dynamic batcher. One version holds the
instances, the tensor specs reconciled between the file and model.yaml, the labels and the batcher.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from ..backends.base import BACKENDS, get_backend
from ..batching import DynamicBatcher, InferRequest
from ..config import ModelConfig
from ..errors import ConfigError, InvalidInput, QueueFull, Unavailable
from ..executors.base import InstanceSpec, make_instances
from ..metrics import ModelMetrics
from ..paths import confined
from ..split import serve as _pipeline  # noqa: F401 - registers backend: pipeline
from ..tensors import TensorSpec
from .base import LoadContext, ServedModel, TensorRequest, register_kind
from .outputs import LABEL_OUTPUT, check_outputs, select_outputs

log = logging.getLogger("rtserve.models")
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_export", "tflite": "tflite"}


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


@register_kind
class TensorModel(ServedModel):
    """One served version. ``infer`` validates and queues; the batcher's instance threads run."""

    kind = "tensor"
    described = "a tensor model"

    @classmethod
    def served_backends(cls) -> tuple[str, ...]:
        get_backend("onnx")  # imports the built-in backends
        return tuple(BACKENDS)

    @property
    def api(self) -> str:
        return f"/v2/models/{self.name}/infer"

    @classmethod
    def load(cls, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> "TensorModel":
        backend_cls = get_backend(config.backend)
        path = backend_cls.find_file(model_dir / str(version))
        metrics = ctx.metrics.tensor.for_model(config.name, str(version)) if ctx.metrics else None
        try:
            ctx.check_inside(model_dir, [path])  # before model_files reads it
            ctx.check_inside(model_dir, backend_cls.model_files(path))
            return cls(config, model_dir, version, path, metrics, ctx.allow_symlinks)
        except ConfigError as e:
            if e.message.startswith("model '"):
                raise
            raise ConfigError(f"model '{config.name}' version {version} ({path}): {e.message}") from None

    def __init__(self, config: ModelConfig, model_dir: Path, version: int, path: Path,
                 metrics: ModelMetrics | None = None, allow_symlinks: bool = False) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.path = path
        backend_cls = get_backend(config.backend)
        self.device = backend_cls.resolve_device(config.device)
        out_names = [o.name for o in config.outputs] if config.outputs else None
        where = f"model '{self.name}' version {self.version} ({path})"
        spec = InstanceSpec.of(backend_cls, path, self.device, config.backend_options, config.instances, out_names)
        self.instances = make_instances(config.executor, spec, config.instances, config.executor_options)
        try:
            first = self.instances[0]
            self.batched = config.max_batch_size > 0
            self.inputs = _reconcile("input", config.inputs, first.file_inputs, self.batched, where)
            self.outputs = _reconcile("output", config.outputs, first.file_outputs, self.batched, where)
            self.input_by_name = {s.name: s for s in self.inputs}
            self.labels = self._read_labels(model_dir, where, allow_symlinks)
            if config.warmup:
                self._warmup(where)
        except BaseException:
            self.release()
            raise
        self.metrics = metrics
        # a pipeline takes ``in_flight`` batches at once: that many runner threads for its one instance
        runners = [b.run for b in self.instances for _ in range(b.in_flight)]
        self.batcher = DynamicBatcher(self.name, runners, config.max_batch_size, config.batching, metrics)

    def _read_labels(self, model_dir: Path, where: str, allow_symlinks: bool = False) -> list[str] | None:
        if not self.config.labels:
            return None
        p = confined(model_dir, self.config.labels, f"{where}: labels", allow_symlinks)
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
                out = inst.run(feeds)
            except Exception as e:
                raise ConfigError(f"{where}: warm-up run failed: {type(e).__name__}: {e}") from None
        # a hint only: a model may rightly answer NaN or inf for all-zero inputs (log, x / |x|)
        bad = [k for k, v in out.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]
        if bad:
            log.warning("%s: warm-up outputs %s hold NaN or inf for all-zero inputs; check the weights",
                        where, ", ".join(bad))

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

    def _spec(self, name: str) -> TensorSpec:
        spec = self.input_by_name.get(name)
        if spec is None:
            raise InvalidInput(f"model '{self.name}': unknown input '{name}'; expected {sorted(self.input_by_name)}")
        return spec

    def check_input(self, name: str, datatype: str, shape) -> None:
        """Name, datatype, shape against the spec and the batch size against max_batch_size."""
        spec = self._spec(name)
        if datatype != spec.datatype:
            raise InvalidInput(f"model '{self.name}': input '{name}' must be {spec.datatype}")
        spec.check(tuple(shape), self.batched)
        if self.batched:
            if shape[0] == 0:
                raise InvalidInput(f"model '{self.name}': batch size must be at least 1")
            if shape[0] > self.config.max_batch_size:
                raise InvalidInput(f"model '{self.name}': batch size {shape[0]} exceeds max_batch_size "
                                   f"{self.config.max_batch_size}")

    def make_request(self, inputs: dict[str, np.ndarray], priority: int | None = None,
                     timeout_s: float | None = None) -> InferRequest:
        """Validate names, datatypes and shapes and build the queued request."""
        batch = None
        for name, arr in inputs.items():
            spec = self._spec(name)
            if arr.dtype != spec.dtype and not (spec.datatype == "BYTES" and arr.dtype == object):
                raise InvalidInput(f"model '{self.name}': input '{name}' must be {spec.datatype}")
            self.check_input(name, spec.datatype, arr.shape)
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

    def count_rejected(self, reason: str) -> None:
        if self.metrics:
            self.metrics.failed(reason)

    def admit(self) -> None:
        if self.batcher.queue.full:  # shed load before the body is read and decoded
            self.batcher.reject_full()

    async def infer(self, request: TensorRequest) -> dict[str, np.ndarray]:
        """Validate, queue, await the batch, post-process; the requested outputs in order. If the
        caller is cancelled (its client went away) before the request runs, it leaves the queue."""
        t0 = time.perf_counter()
        try:
            check_outputs(self.name, self.all_outputs, request.outputs)
            outputs = await self.run_tensors(request.inputs, request.priority, request.timeout_s)
        except InvalidInput:
            self.count_rejected("invalid_input")
            raise
        result = select_outputs(outputs, self.all_outputs, request.outputs, self.labels, self.batched)
        if self.metrics:
            self.metrics.success.inc()
            self.metrics.request_s.observe(time.perf_counter() - t0)
        return result

    async def run_tensors(self, inputs: dict[str, np.ndarray], priority: int | None = None,
                          timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Every output (labels included) for ``inputs``, through the batcher (ensemble steps call this)."""
        req = self.make_request(inputs, priority, timeout_s)
        try:
            fut = self.batcher.submit(req)
        except Unavailable as e:  # closed after a reload: the replacement serves it
            successor = self.replaced_by
            if isinstance(e, QueueFull) or not isinstance(successor, TensorModel):
                raise
            return await successor.run_tensors(inputs, priority, timeout_s)
        try:
            out = await fut
        except asyncio.CancelledError:  # the caller is gone; the batcher skips a done future
            self.batcher.cancel(req)  # drops it if it has not started
            raise
        return self.postprocess(out)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        await self.batcher.drain(drain_timeout_s)
        await self.batcher.close()
        await asyncio.to_thread(self.release)

    def release(self) -> None:
        for inst in self.instances:
            inst.close()
