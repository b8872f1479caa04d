"""Use a repository model without the server: ``rtserve.Model("model_repository/digits")``.

Loads a tensor model exactly as the server does (same model.yaml, validation and post-processing)
and runs each call directly on an instance: no queue, no batching, no event loop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..config import list_versions, read_config
from .base import LoadContext
from .tensor import TensorModel


class Model:
    """A served model, in process. ``infer({"image": x})`` returns ``{"logits": ..., "label": ...}``."""

    def __init__(self, model_dir: str | Path, version: int | None = None) -> None:
        model_dir = Path(model_dir)
        config = read_config(model_dir)
        chosen = [version] if version is not None else config.version_policy.select(list_versions(model_dir))
        if not chosen or not (model_dir / str(chosen[-1])).is_dir():
            raise ConfigError(f"model '{config.name}': no version {version or ''} to load in {model_dir}")
        v = chosen[-1]
        self._model = TensorModel.load(config, model_dir, v, LoadContext())
        self.name, self.version = self._model.name, v

    @property
    def metadata(self) -> dict:
        return self._model.metadata()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        req = self._model.make_request({k: np.asarray(a) for k, a in inputs.items()})
        return self._model.postprocess(self._model.instances[0].run(req.inputs))

    def close(self) -> None:
        self._model.release()
