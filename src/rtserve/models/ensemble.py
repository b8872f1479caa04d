"""Ensembles: several repository models (and built-in pre/post-processing functions) composed into
one served model, a directed acyclic graph of steps in ``model.yaml``:

    backend: ensemble
    max_batch_size: 64
    inputs:  [{name: image, datatype: FP32, shape: [1, 8, 8]}]
    outputs: [{name: probabilities, datatype: FP32, shape: [10]}, {name: label, datatype: BYTES, shape: [1]}]
    steps:
      - {name: classify, model: digits, inputs: {image: image}, outputs: {logits: logits, label: label}}
      - {name: probs, function: softmax, inputs: {x: logits}, outputs: {y: probabilities}}

A step maps its own input names to ensemble tensors (``inputs: {step_input: tensor}``) and its
outputs to new tensors. Steps run as soon as their inputs exist (independent steps at the same
time: fan-out and fan-in), each through its model's own dynamic batcher, so an ensemble's requests
are batched with everyone else's requests for that model. Everything is checked at load time, naming
the step: a missing or unready model, a cycle, an input nobody produces, a tensor produced twice, a
datatype or shape that differs between producer and consumer.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, InvalidInput, NotFound, Unavailable
from ..tensors import TensorSpec, numpy_to_v2
from .base import LoadContext, ServedModel, TensorRequest, register_kind
from .embedding import EmbeddingModel
from .outputs import check_outputs, select_outputs
from .tensor import TensorModel


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Function:
    """A built-in step: one input ``x``, one output ``y``; ``out`` gives the output spec from the input's."""

    fn: Callable[[np.ndarray], np.ndarray]
    out: Callable[[TensorSpec], TensorSpec]
    accepts: tuple[str, ...] = ("FP32", "FP16", "FP64")


FUNCTIONS = {
    "softmax": Function(_softmax, lambda s: TensorSpec("y", "FP32", s.shape)),
    "l2_normalize": Function(_l2, lambda s: TensorSpec("y", "FP32", s.shape)),
    "argmax": Function(lambda x: x.argmax(axis=-1).astype(np.int64)[..., None],
                       lambda s: TensorSpec("y", "INT64", (1,))),
    "identity": Function(lambda x: x, lambda s: TensorSpec("y", s.datatype, s.shape),
                         accepts=("FP32", "FP16", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES")),
}


@dataclass(frozen=True)
class Step:
    name: str
    model: str | None
    version: str | None
    function: str | None
    inputs: dict[str, str]    # step input -> ensemble tensor
    outputs: dict[str, str]   # step output -> ensemble tensor


def parse_steps(raw) -> list[Step]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("steps: expected a non-empty list of steps")
    steps, names = [], set()
    for i, s in enumerate(raw):
        where = f"steps[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = sorted(set(s) - {"name", "model", "version", "function", "inputs", "outputs"})
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'")
        name = str(s.get("name") or f"step{i}")
        if name in names:
            raise ConfigError(f"step '{name}': the name is used twice")
        names.add(name)
        if ("model" in s) == ("function" in s):
            raise ConfigError(f"step '{name}': give exactly one of 'model' or 'function'")
        if "function" in s and s["function"] not in FUNCTIONS:
            raise ConfigError(f"step '{name}': function '{s['function']}' is not one of {', '.join(FUNCTIONS)}")
        for key in ("inputs", "outputs"):
            m = s.get(key)
            if not isinstance(m, dict) or not m or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
                raise ConfigError(f"step '{name}': '{key}' must map the step's tensor names to ensemble tensor names")
        steps.append(Step(name, s.get("model"), str(s["version"]) if s.get("version") is not None else None,
                          s.get("function"), dict(s["inputs"]), dict(s["outputs"])))
    return steps


def _compatible(a: TensorSpec, b: TensorSpec) -> bool:
    return a.datatype == b.datatype and len(a.shape) == len(b.shape) and all(
        x == y or x == -1 or y == -1 for x, y in zip(a.shape, b.shape))


def _spec_text(s: TensorSpec) -> str:
    return f"{s.datatype} {list(s.shape)}"


@register_kind
class EnsembleModel(ServedModel):
    kind = "ensemble"
    described = "an ensemble"
    backends = ("ensemble",)
    loads_last = True
    versionless = True

    @property
    def api(self) -> str:
        return f"/v2/models/{self.name}/infer"

    @classmethod
    def load(cls, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> "EnsembleModel":
        try:
            return cls(config, list(config.steps), ctx.get_model)
        except ConfigError as e:
            raise ConfigError(f"model '{config.name}' (ensemble): {e.message}") from None

    def __init__(self, config: ModelConfig, steps_raw, get_model) -> None:
        """``get_model(name, version)`` returns a loaded repository model or raises NotFound."""
        self.config, self.name, self.version = config, config.name, 1
        self._get_model = get_model
        if config.max_batch_size < 1:
            raise ConfigError("backend ensemble: max_batch_size must be >= 1 (steps pass whole batches along)")
        if not config.inputs or not config.outputs:
            raise ConfigError("backend ensemble: 'inputs' and 'outputs' must be declared in model.yaml")
        self.inputs, self.outputs = config.inputs, config.outputs
        self.input_by_name = {s.name: s for s in self.inputs}
        self.batched, self.labels, self.metrics = True, None, None
        self.steps = parse_steps(steps_raw)
        self.models: dict[str, object] = {}
        specs: dict[str, TensorSpec] = {s.name: s for s in self.inputs}
        producer = {s.name: "the ensemble's inputs" for s in self.inputs}
        self.order = self._order(producer)
        for step in self.order:
            out_specs = self._check_step(step, specs)
            for own, tensor in step.outputs.items():
                if tensor in producer:
                    raise ConfigError(f"step '{step.name}': tensor '{tensor}' is already produced by {producer[tensor]}")
                producer[tensor] = f"step '{step.name}'"
                specs[tensor] = TensorSpec(tensor, out_specs[own].datatype, out_specs[own].shape)
        for o in self.outputs:
            if o.name not in specs:
                raise ConfigError(f"output '{o.name}': no step produces it")
            if not _compatible(o, specs[o.name]):
                raise ConfigError(f"output '{o.name}': declared {_spec_text(o)}, but {producer[o.name]} gives "
                                  f"{_spec_text(specs[o.name])}")
        self.specs = specs

    def _order(self, producer: dict) -> list[Step]:
        """Topological order (Kahn); a cycle or an input nobody produces is an error naming the steps."""
        made = {t: None for t in producer}
        for s in self.steps:
            for t in s.outputs.values():
                made.setdefault(t, s.name)
        for s in self.steps:
            for own, t in s.inputs.items():
                if t not in made:
                    raise ConfigError(f"step '{s.name}': input '{own}' reads tensor '{t}', which no step produces "
                                      "and is not an ensemble input")
        done, order, pending = set(producer), [], list(self.steps)
        while pending:
            ready = [s for s in pending if all(t in done for t in s.inputs.values())]
            if not ready:
                raise ConfigError("steps form a cycle: " + " -> ".join(f"'{s.name}'" for s in pending))
            for s in ready:
                order.append(s)
                pending.remove(s)
                done.update(s.outputs.values())
        return order

    def _check_step(self, step: Step, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        if step.function is not None:
            f = FUNCTIONS[step.function]
            if set(step.inputs) != {"x"} or set(step.outputs) != {"y"}:
                raise ConfigError(f"step '{step.name}': function '{step.function}' takes input 'x' and gives output 'y'")
            x = specs[step.inputs["x"]]
            if x.datatype not in f.accepts:
                raise ConfigError(f"step '{step.name}': function '{step.function}' does not take {x.datatype}")
            return {"y": f.out(x)}
        return self._check_model_step(step, specs)

    def _check_model_step(self, step: Step, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        try:
            model = self._get(step)
        except NotFound:
            raise ConfigError(f"step '{step.name}': model '{step.model}'"
                              f"{' version ' + step.version if step.version else ''} is not loaded") from None
        if isinstance(model, EmbeddingModel):
            return self._check_embedding_step(step, specs, model)
        if not isinstance(model, TensorModel):
            raise ConfigError(f"step '{step.name}': model '{step.model}' is a {model.kind} model; "
                              "steps take tensor and embedding models")
        if not model.batched:
            raise ConfigError(f"step '{step.name}': model '{step.model}' does not batch (max_batch_size 0)")
        self.models[step.name] = model
        want = {s.name: s for s in model.inputs}
        missing = sorted(set(want) - set(step.inputs))
        if missing:
            raise ConfigError(f"step '{step.name}': model '{step.model}' input '{missing[0]}' is not mapped")
        for own, tensor in step.inputs.items():
            if own not in want:
                raise ConfigError(f"step '{step.name}': model '{step.model}' has no input '{own}'")
            if not _compatible(want[own], specs[tensor]):
                raise ConfigError(f"step '{step.name}': input '{own}' needs {_spec_text(want[own])}, tensor "
                                  f"'{tensor}' is {_spec_text(specs[tensor])}")
        have = {s.name: s for s in model.all_outputs}
        for own in step.outputs:
            if own not in have:
                raise ConfigError(f"step '{step.name}': model '{step.model}' has no output '{own}'")
        return have

    def _check_embedding_step(self, step: Step, specs: dict[str, TensorSpec], model) -> dict[str, TensorSpec]:
        """An embedding model as a step: input ``text`` (BYTES, one string per item) -> ``embedding``."""
        if set(step.inputs) != {"text"} or set(step.outputs) != {"embedding"}:
            raise ConfigError(f"step '{step.name}': embedding model '{step.model}' takes input 'text' and gives "
                              "output 'embedding'")
        src = specs[step.inputs["text"]]
        if src.datatype != "BYTES" or src.shape not in ((), (1,)):
            raise ConfigError(f"step '{step.name}': input 'text' needs BYTES [] (one string per item), tensor "
                              f"'{step.inputs['text']}' is {_spec_text(src)}")
        self.models[step.name] = model
        return {"embedding": TensorSpec("embedding", "FP32", (model.dimensions,))}

    async def _embed(self, model, texts: np.ndarray) -> np.ndarray:
        strings = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]
        try:
            token_ids = model.tokenize(strings)
            model.check(token_ids)
        except ValueError as e:
            raise InvalidInput(f"model '{self.name}': {e}") from None
        return np.asarray(await model.embed(token_ids), dtype=np.float32)

    def _get(self, step: Step):
        return self._get_model(step.model, step.version)

    # -- serving -----------------------------------------------------------------------------------
    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Nothing of its own to drain: each step's requests are its model's, drained by that model."""

    @property
    def all_outputs(self) -> list[TensorSpec]:
        return list(self.outputs)

    def check_input(self, name: str, datatype: str, shape) -> None:
        """Name, datatype, shape ([batch, *declared]) and batch size against the declared inputs."""
        spec = self.input_by_name.get(name)
        if spec is None:
            raise InvalidInput(f"model '{self.name}': unknown input '{name}'; expected {sorted(self.input_by_name)}")
        if datatype != spec.datatype:
            raise InvalidInput(f"input '{name}': datatype {datatype}, the model takes {spec.datatype}")
        if len(shape) != len(spec.shape) + 1 or any(d != -1 and d != a for d, a in zip(spec.shape, shape[1:])):
            raise InvalidInput(f"input '{name}': shape {list(shape)}, the model takes {[-1, *spec.shape]}")
        if shape[0] == 0:
            raise InvalidInput(f"model '{self.name}': batch size must be at least 1")
        if shape[0] > self.config.max_batch_size:
            raise InvalidInput(f"model '{self.name}': batch size {shape[0]} exceeds max_batch_size "
                               f"{self.config.max_batch_size}")

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> int:
        """Names, datatypes and shapes against the declared inputs; returns the batch size."""
        missing = sorted(set(self.input_by_name) - set(inputs))
        if missing:
            raise InvalidInput(f"model '{self.name}': missing input '{missing[0]}'")
        batch = None
        for name, arr in inputs.items():
            self.check_input(name, numpy_to_v2(arr.dtype), arr.shape)
            if batch is not None and arr.shape[0] != batch:
                raise InvalidInput(f"input '{name}': batch {arr.shape[0]} differs from the other inputs' {batch}")
            batch = arr.shape[0]
        return batch or 0

    async def infer(self, request: TensorRequest) -> dict[str, np.ndarray]:
        """Run the step graph (each model step through its own model's batcher); the requested
        outputs in order. A step model unloaded since the ensemble loaded is a 503."""
        check_outputs(self.name, self.all_outputs, request.outputs)
        try:
            outputs = await self.run_graph(request.inputs, request.priority, request.timeout_s)
        except NotFound as e:
            raise Unavailable(f"model '{self.name}': {e}") from None
        return select_outputs(outputs, self.all_outputs, request.outputs, None, True)

    async def run_graph(self, inputs: dict[str, np.ndarray], priority: int | None = None,
                        timeout_s: float | None = None) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        tensors: dict[str, np.ndarray] = dict(inputs)
        events = {t: asyncio.Event() for s in self.steps for t in s.outputs.values()}

        async def run(step: Step) -> None:
            for t in step.inputs.values():
                if t in events:
                    await events[t].wait()
            feeds = {own: tensors[t] for own, t in step.inputs.items()}
            if step.function is not None:
                out = {"y": FUNCTIONS[step.function].fn(feeds["x"])}
            elif isinstance(self.models.get(step.name), EmbeddingModel):
                out = {"embedding": await self._embed(self._get(step), feeds["text"])}
            else:
                # resolved per request, so a reloaded step model is picked up (and an unloaded one is an error)
                out = await self._get(step).run_tensors(feeds, priority, timeout_s)
            for own, t in step.outputs.items():
                tensors[t] = out[own]
                events[t].set()

        tasks = [asyncio.ensure_future(run(s)) for s in self.order]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return {o.name: tensors[o.name] for o in self.outputs}

    def metadata(self) -> dict:
        def meta(specs):
            return [{"name": s.name, "datatype": s.datatype, "shape": [-1, *s.shape]} for s in specs]

        return {"name": self.name, "versions": ["1"], "platform": "ensemble", "inputs": meta(self.inputs),
                "outputs": meta(self.outputs)}

    def config_json(self) -> dict:
        return {"name": self.name, "platform": "ensemble", "max_batch_size": self.config.max_batch_size,
                "steps": [{"name": s.name, "model": s.model, "version": s.version, "function": s.function,
                           "inputs": s.inputs, "outputs": s.outputs} for s in self.order]}
