"""Model repository on disk: discover models, pick versions by policy, load and unload them hot.

    <root>/<model>/model.yaml
    <root>/<model>/<version>/model.{onnx,pt2,tflite} | pipeline.json | a Hugging Face checkpoint

``model.yaml``'s ``backend:`` picks the model kind (``models.base.kind_for``); the repository only
knows the ``ServedModel`` contract.

A model that fails to load, whatever the exception, is recorded (UNAVAILABLE) with one message
naming the model, the version, the file when known and the problem, and logged (with the
traceback when the failure is not the configuration's); every other model still loads and serves,
and a later load tries again. A failed reload keeps serving the versions that were loaded.
Errors raised: ConfigError (400) when the model.yaml or a model file cannot be used,
ModelLoadError (500) for any other failure, NotFound (404) for a model that is not on disk.

Every file a model reads stays inside the repository folder: the model folder, its model files and
checkpoints may not be symlinks to elsewhere unless ``allow_symlinks`` (``paths.confined``).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .config import CONFIG_FILE, ModelConfig, list_versions, read_config  # noqa: F401 - re-exported
from .errors import ConfigError, InvalidInput, ModelLoadError, NotFound, RtserveError, Unavailable
from .metrics import ServingMetrics
from .models.base import LoadContext, ServedModel, kind_for
from .paths import confined

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

    def __init__(self, root: Path | str, metrics: ServingMetrics | None = None, allow_symlinks: bool = False) -> None:
        self.root = Path(root)
        self.metrics = metrics
        self.allow_symlinks = allow_symlinks
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
        except Exception:  # the load itself reports it
            return False

    async def load(self, name: str) -> ModelEntry:
        """Load (or reload) ``name`` from disk without stopping the others. Raises ConfigError,
        ModelLoadError or NotFound; the entry is never left LOADING."""
        check_model_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model_dir = self.root / name
            if not (model_dir / CONFIG_FILE).is_file():
                raise NotFound(f"model '{name}' is not in the repository {self.root}")
            old = self.entries.get(name)
            serving = old is not None and old.state is ModelState.READY
            if not serving:
                self.entries[name] = ModelEntry(name, ModelState.LOADING)
            try:
                versions = await asyncio.to_thread(self._load_versions, model_dir)
                await self._start(versions)
            except BaseException as e:
                err = self._failed(name, e)
                if serving:  # keep serving the versions that were loaded
                    old.reason = f"reload failed, serving the loaded versions: {err.message}"
                else:
                    self.entries[name] = ModelEntry(name, ModelState.UNAVAILABLE, err.message)
                if err is e or not isinstance(e, Exception):  # cancelled or interrupted: as it was
                    raise
                raise err from e
            self.entries[name] = ModelEntry(name, ModelState.READY, "", versions)
            if old is not None and old.versions:
                for v, m in old.versions.items():
                    if versions.get(v) is not None and versions[v] is not m:
                        m.replaced_by = versions[v]  # requests in flight to it go on to the new one
                await self._close_versions(old.versions, keep=versions)
            log.info("loaded model '%s' versions %s", name, sorted(versions))
            return self.entries[name]

    @staticmethod
    def _failed(name: str, e: BaseException) -> RtserveError:
        """The error a failed load of ``name`` answers with, logged once (traceback unless it is
        the configuration's fault)."""
        if isinstance(e, RtserveError):
            log.error("%s", e.message, exc_info=e if isinstance(e, ModelLoadError) else None)
            return e
        if not isinstance(e, Exception):  # cancelled, interrupted
            log.error("loading model '%s' was interrupted (%s)", name, type(e).__name__)
            return ModelLoadError(f"model '{name}': loading was interrupted ({type(e).__name__})")
        err = ModelLoadError(f"model '{name}': {type(e).__name__}: {e}")
        log.error("%s", err.message, exc_info=e)
        return err

    @staticmethod
    async def _start(versions: dict[int, ServedModel]) -> None:
        """Start every version; if one fails, close those started and release the rest."""
        started: list[ServedModel] = []
        try:
            for m in versions.values():
                m.start()
                started.append(m)
        except BaseException:
            for m in versions.values():
                try:
                    if any(m is s for s in started):
                        await m.close(0.0)
                    else:
                        m.release()
                except Exception:
                    log.exception("closing model '%s' version %s after a failed start", m.name, m.version)
            raise

    def _load_versions(self, model_dir: Path) -> dict[int, ServedModel]:
        name = model_dir.name
        confined(self.root, name, f"model '{name}' folder", self.allow_symlinks)
        confined(self.root, f"{name}/{CONFIG_FILE}", f"model '{name}' {CONFIG_FILE}", self.allow_symlinks)
        config = read_config(model_dir)
        kind = kind_for(config.backend)
        ctx = LoadContext(self.metrics, self.get, self.allow_symlinks)
        if kind.versionless:  # no files of its own: one version built from the loaded models
            return {1: _load_version(kind, config, model_dir, 1, ctx)}
        available = list_versions(model_dir)
        chosen = config.version_policy.select(available)
        if not chosen:
            raise ConfigError(f"model '{config.name}': no version folder matches the version policy "
                              f"(found {available or 'none'} in {model_dir})")
        loaded: dict[int, ServedModel] = {}
        try:
            for v in chosen:
                loaded[v] = _load_version(kind, config, model_dir, v, ctx)
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
            log.info("unloaded model '%s' versions %s", name, sorted(versions))

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


def _load_version(kind, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> ServedModel:
    """``kind.load`` whose failures all name the model and version: a ConfigError as it is, any
    other exception as a ModelLoadError with its type and message (traceback chained)."""
    try:
        return kind.load(config, model_dir, version, ctx)
    except ConfigError as e:
        if e.message.startswith("model '"):
            raise
        raise ConfigError(f"model '{config.name}': {e.message}") from None
    except RtserveError:
        raise
    except Exception as e:
        raise ModelLoadError(f"model '{config.name}' version {version} ({model_dir / str(version)}): "
                             f"{type(e).__name__}: {e}") from e
