"""Backend extension point: one small base class, one module per runtime, a registry by name.

A backend loads one model file from a version folder and runs whole batches. It knows nothing of
HTTP, queues or batching: the batcher hands it a dict of numpy arrays (batch dimension first when
the model batches) and takes back a dict of numpy arrays.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ConfigError
from ..tensors import TensorSpec

BACKENDS: dict[str, type["Backend"]] = {}


def register(cls: type["Backend"]) -> type["Backend"]:
    """Class decorator: make a backend available to ``model.yaml`` under ``cls.name``."""
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> type["Backend"]:
    _import_builtin()
    try:
        return BACKENDS[name]
    except KeyError:
        known = sorted(BACKENDS)
        raise ConfigError(f"backend: '{name}' is not one of {', '.join(known)}") from None


def _import_builtin() -> None:
    # Imported lazily so that `import rtserve` pulls in no runtime it does not use.
    # (``pipeline``, a backend made of other backends, lives in ``split/serve.py`` and registers
    # itself when the tensor model kind imports it)
    if {"onnx", "torch", "tflite"} <= BACKENDS.keys():
        return
    from . import onnx, tflite, torch  # noqa: F401


def default_threads(instances: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, instances))


class Backend(ABC):
    """Runs one loaded model.

    Subclasses set ``name`` (the ``backend:`` value in model.yaml) and ``file_names`` (model files
    looked for in a version folder, first match wins), load in ``__init__`` and fill
    ``file_inputs``/``file_outputs`` with the tensors the file declares, *including* the batch
    dimension (-1 where the file leaves a dimension free).

    Args:
        path: the model file.
        device: resolved device, ``cpu`` or ``cuda:N``.
        options: ``backend_options`` from model.yaml (e.g. ``intra_op_threads``).
        instances: how many instances of this model run side by side (to size thread pools).
        output_names: names for outputs the file leaves unnamed (.pt2), from model.yaml.

    Raises:
        ConfigError: the file does not load or an option is invalid.
    """

    name: ClassVar[str]
    file_names: ClassVar[tuple[str, ...]]

    file_inputs: list[TensorSpec]
    file_outputs: list[TensorSpec]
    #: batches the batcher may run on this instance at once (``run`` from that many threads); a
    #: pipeline takes one per stage, so stage 2 works on batch i while stage 1 starts batch i+1
    in_flight: int = 1

    def __init__(self, path: Path, device: str, options: dict, instances: int = 1,
                 output_names: list[str] | None = None) -> None:
        self.path = path
        self.device = device
        self.options = options

    @classmethod
    def resolve_device(cls, device: str) -> str:
        """Map ``auto`` to the best device this runtime can use here."""
        return "cpu" if device == "auto" else device

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Called from ``in_flight`` executor threads at a time per instance (one,
        unless the backend says otherwise)."""

    def close(self) -> None:
        """Release the runtime's resources (sessions, GPU memory)."""

    @classmethod
    def find_file(cls, version_dir: Path) -> Path:
        for fname in cls.file_names:
            p = version_dir / fname
            if p.is_file():
                return p
        raise ConfigError(f"{version_dir}: no model file found (looked for {', '.join(cls.file_names)})")

    @classmethod
    def model_files(cls, path: Path) -> list[Path]:
        """Every file an instance will read for the model file ``path`` (``find_file``'s answer):
        the model kind checks they stay inside the repository before loading. A backend whose
        file names others (a pipeline's stages) lists them too."""
        return [path]


def check_options(backend: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"backend_options: '{unknown[0]}' is not an option of the {backend} backend; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
