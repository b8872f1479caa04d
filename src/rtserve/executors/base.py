"""Executors: where a model instance runs. One factory, ``make_instances``, for every caller (a
tensor model's instances, a pipeline's stages, an LLM's layer stages), and a registry by name:

- ``local``: in the server process; the batcher's instance threads call it directly (the default);
- ``process``: a worker process per instance, tensors through shared memory (``process.py``);
- ``ray``: a Ray actor per instance, placed by one placement group per call (``ray.py``).

An instance has a backend's interface (``run``, ``file_inputs``, ``file_outputs``, ``close``,
``in_flight``), so whoever drives it does not know where it runs. Executors never import a backend:
an ``InstanceSpec`` names the backend class as ``"module:Class"``, imported where the instance runs
(so this package sits beside ``backends/``, not above it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..errors import ConfigError
from ..tensors import TensorSpec


class Instance(Protocol):
    """What an executor hands back: a backend, or a stand-in with its interface."""

    file_inputs: list[TensorSpec]
    file_outputs: list[TensorSpec]
    in_flight: int

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class InstanceSpec:
    """How to build one instance, wherever it runs.

    ``factory`` is ``"module:Class"`` of a class called as ``Class(path, device, options, instances,
    output_names)`` (every ``Backend`` subclass, and the LLM's stage backend)."""

    factory: str
    path: str
    device: str
    options: dict = field(default_factory=dict)
    instances: int = 1
    output_names: list[str] | None = None

    @classmethod
    def of(cls, backend_cls: type, path: Path | str, device: str, options: dict, instances: int = 1,
           output_names: list[str] | None = None) -> "InstanceSpec":
        return cls(f"{backend_cls.__module__}:{backend_cls.__qualname__}", str(path), device, dict(options),
                   instances, output_names)

    def build(self):
        """Import the factory and build the instance here."""
        module, _, name = self.factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
        return factory(Path(self.path), self.device, self.options, self.instances, self.output_names)


#: executor name -> make(spec, count, executor_options) -> instances
Maker = Callable[[InstanceSpec, int, dict], list]
EXECUTORS: dict[str, Maker] = {}


def register_executor(name: str) -> Callable[[Maker], Maker]:
    def deco(make: Maker) -> Maker:
        EXECUTORS[name] = make
        return make
    return deco


@register_executor("local")
def _make_local(spec: InstanceSpec, count: int, options: dict) -> list:
    if options:
        raise ConfigError(f"executor_options: the local executor takes none (got '{sorted(options)[0]}')")
    return _all_or_none(spec.build for _ in range(count))


def _all_or_none(builders) -> list:
    """Build every instance, or close the ones built and re-raise."""
    made = []
    try:
        for build in builders:
            made.append(build())
    except BaseException:
        for inst in made:
            inst.close()
        raise
    return made


def _import_builtin() -> None:
    if {"process", "ray"} <= EXECUTORS.keys():
        return
    from . import process, ray  # noqa: F401 - they register themselves; Ray itself is imported on use


def executor_names() -> tuple[str, ...]:
    _import_builtin()
    return tuple(EXECUTORS)


def make_instances(executor: str, spec: InstanceSpec, count: int = 1, options: dict | None = None) -> list:
    """``count`` instances of ``spec`` on ``executor``; ConfigError if one cannot be made (the ones
    already made are closed)."""
    _import_builtin()
    try:
        make = EXECUTORS[executor]
    except KeyError:
        raise ConfigError(f"executor: '{executor}' is not one of {', '.join(executor_names())}") from None
    return make(spec, count, dict(options or {}))
