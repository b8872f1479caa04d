"""Model repository on disk: discover models, pick versions by policy, load and unload them hot.

    <root>/<model>/model.yaml
    <root>/<model>/<version>/model.{onnx,pt2,tflite} | pipeline.json | a Hugging Face checkpoint

``model.yaml``'s ``backend:`` picks the model kind (``models.base.kind_for``); the repository only
knows the ``ServedModel`` contract.

A model that fails to load is recorded with one message naming the model, the file and the
problem; every other model still loads and serves.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .config import CONFIG_FILE, ModelConfig, list_versions, read_config  # noqa: F401 - re-exported
from .errors import ConfigError, InvalidInput, NotFound, RtserveError, Unavailable
from .metrics import ServingMetrics
from .models.base import LoadContext, ServedModel, kind_for

log = logging.getLogger("rtserve.repository")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> None:
    """Model names are folder names: letters, digits, '_', '.', '-', not starting with '.'."""
    if not _NAME_RE.match(name):
        raise InvalidInput(f"'{name}' is not a valid model name (letters, digits, '_', '.', '-'; "
                           "not starting with '.')")


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelEntry:
    name: str
    state: ModelState
    reason: str = ""
    versions: dict[int, ServedModel] | None = None

    @property
    def latest(self) -> ServedModel | None:
        return self.versions[max(self.versions)] if self.versions else None


class ModelRepository:
    """All models of one repository folder and their loaded versions."""

    def __init__(self, root: Path | str, metrics: ServingMetrics | None = None) -> None:
        self.root = Path(root)
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def discover(self) -> list[str]:
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} is not a folder")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())

    def index(self) -> list[dict]:
        """Triton's repository index: every model on disk with its state."""
        out = []
        names = set(self.discover()) | set(self.entries)
        for name in sorted(names):
            e = self.entries.get(name)
            if e is None:
                out.append({"name": name, "state": ModelState.UNAVAILABLE.value, "reason": "not loaded"})
            elif e.versions:
                for v in sorted(e.versions):
                    out.append({"name": name, "version": str(v), "state": e.state.value, "reason": e.reason})
            else:
                out.append({"name": name, "state": e.state.value, "reason": e.reason})
        return out

    async def load_all(self) -> None:
        names = self.discover()
        # ensembles last: their steps name models that must be loaded first
        names.sort(key=lambda n: self._loads_last(n))
        for name in names:
            try:
                await self.load(name)
            except RtserveError:
                pass  # recorded in entries[name].reason and logged

    def _loads_last(self, name: str) -> bool:
        try:
            return kind_for(read_config(self.root / name).backend).loads_last
        except (ConfigError, OSError):
            return False

    async def load(self, name: str) -> ModelEntry:
        """Load (or reload) ``name`` from disk without stopping the others. Raises ConfigError."""
        check_model_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model_dir = self.root / name
            if not (model_dir / CONFIG_FILE).is_file():
                raise NotFound(f"model '{name}' is not in the repository {self.root}")
            old = self.entries.get(name)
            if old is None or old.state is not ModelState.READY:
                self.entries[name] = ModelEntry(name, ModelState.LOADING)
            try:
                versions = await asyncio.to_thread(self._load_versions, model_dir)
            except ConfigError as e:
                log.error("%s", e.message)
                if old is not None and old.state is ModelState.READY:
                    raise  # keep serving the versions that were loaded
                self.entries[name] = ModelEntry(name, ModelState.UNAVAILABLE, e.message)
                raise
            for m in versions.values():
                m.start()
            self.entries[name] = ModelEntry(name, ModelState.READY, "", versions)
            if old is not None and old.versions:
                for v, m in old.versions.items():
                    if versions.get(v) is not None and versions[v] is not m:
                        m.replaced_by = versions[v]  # requests in flight to it go on to the new one
                await self._close_versions(old.versions, keep=versions)
            log.info("loaded model '%s' versions %s", name, sorted(versions))
            return self.entries[name]

    def _load_versions(self, model_dir: Path) -> dict[int, ServedModel]:
        config = read_config(model_dir)
        kind = kind_for(config.backend)
        ctx = LoadContext(self.metrics, self.get)
        if kind.versionless:  # no files of its own: one version built from the loaded models
            return {1: kind.load(config, model_dir, 1, ctx)}
        available = list_versions(model_dir)
        chosen = config.version_policy.select(available)
        if not chosen:
            raise ConfigError(f"model '{config.name}': no version folder matches the version policy "
                              f"(found {available or 'none'} in {model_dir})")
        loaded: dict[int, ServedModel] = {}
        try:
            for v in chosen:
                try:
                    loaded[v] = kind.load(config, model_dir, v, ctx)
                except ConfigError as e:
                    if e.message.startswith("model '"):
                        raise
                    raise ConfigError(f"model '{config.name}': {e.message}") from None
        except BaseException:
            for m in loaded.values():
                m.release()
            raise
        return loaded

    async def unload(self, name: str, drain_timeout_s: float = 10.0) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            e = self.entries.get(name)
            if e is None or e.state is not ModelState.READY:
                raise NotFound(f"model '{name}' is not loaded")
            e.state = ModelState.UNLOADING
            versions = e.versions or {}
            self.entries[name] = ModelEntry(name, ModelState.UNAVAILABLE, "unloaded")
            await self._close_versions(versions, keep={}, drain_timeout_s=drain_timeout_s)

    async def _close_versions(self, versions: dict[int, ServedModel], keep: dict[int, ServedModel],
                              drain_timeout_s: float = 10.0) -> None:
        for v, m in versions.items():
            if keep.get(v) is m:
                continue
            await m.close(drain_timeout_s)
            if self.metrics and v not in keep:  # a reloaded version shares its metric children
                self.metrics.drop(m.name, str(v))

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        for name in list(self.entries):
            e = self.entries[name]
            if e.versions:
                await self._close_versions(e.versions, keep={}, drain_timeout_s=drain_timeout_s)
        self.entries.clear()

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served version (latest when none is named). Raises NotFound or Unavailable."""
        e = self.entries.get(name)
        if e is None:
            raise NotFound(f"unknown model '{name}'")
        if e.state is not ModelState.READY or not e.versions:
            raise Unavailable(f"model '{name}' is not ready: {e.state.value}" + (f" ({e.reason})" if e.reason else ""))
        if version is None or version == "":
            return e.latest
        try:
            if not (version.isascii() and version.isdigit()):
                raise ValueError(version)
            return e.versions[int(version)]
        except (ValueError, KeyError):
            raise NotFound(f"model '{name}' has no version '{version}'; served versions: "
                           f"{', '.join(str(v) for v in sorted(e.versions))}") from None

    def served_versions(self, name: str) -> list[str]:
        e = self.entries.get(name)
        return [str(v) for v in sorted(e.versions)] if e is not None and e.versions else []

    def ready_models(self) -> list[ServedModel]:
        return [m for e in self.entries.values() if e.state is ModelState.READY and e.versions
                for m in e.versions.values()]
