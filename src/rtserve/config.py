"""Frozen, validated configuration dataclasses, one per layer.

``model.yaml`` is parsed by :func:`ModelConfig.from_dict`; an unknown key or a bad value raises
:class:`ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .tensors import TensorSpec, V2_TO_NUMPY

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_keys(where: str, data: dict, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(allowed))}")


def _int(where: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def _num(where: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{where}: expected a number >= {minimum}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching policy of one model (see docs/architecture.md, 'Dynamic batching').

    max_queue_delay_ms: upper bound on how long an idle instance may hold a partial batch to let it
        grow; it only waits when recent arrivals predict the batch fills within that bound, so a
        lone request is never delayed. 0 = never wait.
    preferred_batch_sizes: sizes the batcher cuts a batch to when another instance is idle to take
        the rest, and grows toward within the delay bound.
    max_queue_size: requests waiting at most; beyond it the server answers 503 at once.
    priority_levels: number of priority levels; a request's priority is 0..levels-1, higher first.
    default_priority: priority of a request that names none.
    default_timeout_ms: queue deadline of a request that names none (0 = none).
    """

    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    priority_levels: int = 1
    default_priority: int = 0
    default_timeout_ms: float = 0.0

    KEYS = {
        "max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size",
        "priority_levels", "default_priority", "default_timeout_ms",
    }

    def __post_init__(self) -> None:
        if self.max_queue_size < 1:
            raise ConfigError(f"batching.max_queue_size: must be >= 1, got {self.max_queue_size}")
        if self.priority_levels < 1:
            raise ConfigError(f"batching.priority_levels: must be >= 1, got {self.priority_levels}")
        if not 0 <= self.default_priority < self.priority_levels:
            raise ConfigError(
                f"batching.default_priority: must be in 0..{self.priority_levels - 1}, got {self.default_priority}"
            )

    @classmethod
    def from_dict(cls, data: dict | None) -> "BatchingConfig":
        data = data or {}
        _check_keys("batching", data, cls.KEYS)
        kw: dict[str, Any] = {}
        if "max_queue_delay_ms" in data:
            kw["max_queue_delay_ms"] = _num("batching.max_queue_delay_ms", data["max_queue_delay_ms"])
        if "preferred_batch_sizes" in data:
            sizes = data["preferred_batch_sizes"]
            if not isinstance(sizes, list):
                raise ConfigError("batching.preferred_batch_sizes: expected a list of integers")
            kw["preferred_batch_sizes"] = tuple(sorted(_int("batching.preferred_batch_sizes", s, 1) for s in sizes))
        for key in ("max_queue_size", "priority_levels"):
            if key in data:
                kw[key] = _int(f"batching.{key}", data[key], 1)
        if "default_priority" in data:
            kw["default_priority"] = _int("batching.default_priority", data["default_priority"], 0)
        if "default_timeout_ms" in data:
            kw["default_timeout_ms"] = _num("batching.default_timeout_ms", data["default_timeout_ms"])
        return cls(**kw)


@dataclass(frozen=True)
class VersionPolicy:
    """Which version folders are served: the latest N, a specific list, or all."""

    kind: str = "latest"  # latest | specific | all
    latest: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def from_value(cls, value: Any) -> "VersionPolicy":
        if value is None:
            return cls()
        if value == "all":
            return cls(kind="all")
        if isinstance(value, dict) and len(value) == 1:
            (key, arg), = value.items()
            if key == "latest":
                return cls(kind="latest", latest=_int("version_policy.latest", arg, 1))
            if key == "specific":
                if not isinstance(arg, list) or not arg:
                    raise ConfigError("version_policy.specific: expected a non-empty list of version numbers")
                return cls(kind="specific", versions=tuple(_int("version_policy.specific", v, 1) for v in arg))
            if key == "all":
                return cls(kind="all")
        raise ConfigError(
            f"version_policy: expected 'all', {{latest: N}} or {{specific: [1, 2]}}, got {value!r}"
        )

    def select(self, available: list[int]) -> list[int]:
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            return [v for v in available if v in self.versions]
        return available[-self.latest:]


def _tensor_specs(where: str, items: Any) -> tuple[TensorSpec, ...] | None:
    if items is None:
        return None
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of {{name, datatype, shape}}")
    specs = []
    for i, item in enumerate(items):
        _check_keys(f"{where}[{i}]", item, {"name", "datatype", "shape"})
        missing = {"name", "datatype", "shape"} - set(item)
        if missing:
            raise ConfigError(f"{where}[{i}]: missing key '{sorted(missing)[0]}'")
        if item["datatype"] not in V2_TO_NUMPY:
            raise ConfigError(
                f"{where}[{i}].datatype: '{item['datatype']}' is not one of {', '.join(V2_TO_NUMPY)}"
            )
        shape = item["shape"]
        if not isinstance(shape, list):
            raise ConfigError(f"{where}[{i}].shape: expected a list of integers (-1 = variable)")
        try:
            specs.append(TensorSpec(str(item["name"]), item["datatype"], tuple(shape)))
        except ValueError as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None
    return tuple(specs)


def torch_device(device: str) -> str:
    """``auto`` -> ``cuda:0`` when PyTorch sees CUDA, else ``cpu``; ``cuda`` -> ``cuda:0``; others as given."""
    if device == "auto":
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if device == "cuda" else device


@dataclass(frozen=True)
class ModelConfig:
    """One model's ``model.yaml``.

    inputs/outputs: None = read from the model file; when given they are checked against it.
    Shapes exclude the batch dimension when ``max_batch_size > 0`` (Triton's convention).
    """

    name: str
    backend: str
    device: str = "auto"
    instances: int = 1
    max_batch_size: int = 0
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    labels: str | None = None
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    backend_options: dict = field(default_factory=dict)
    warmup: bool = True
    engine: dict = field(default_factory=dict)  # backend llm: llm.engine_config.EngineConfig's fields
    steps: tuple = ()  # backend ensemble: the steps (checked by models.ensemble.parse_steps)
    executor: str = "local"  # local (threads in the server) | process (a worker process per instance) | ray
    executor_options: dict = field(default_factory=dict)  # ray: num_cpus, num_gpus, placement
    #: backend llm: the model's tool-call syntax (llm.tool_parsers) and reasoning markers
    #: (llm.reasoning), by name; None = detected from the chat template (names checked at load)
    tool_parser: str | None = None
    reasoning_parser: str | None = None

    KEYS = {
        "backend", "device", "instances", "max_batch_size", "batching", "inputs", "outputs",
        "labels", "version_policy", "backend_options", "warmup", "name", "engine", "steps", "executor",
        "executor_options", "tool_parser", "reasoning_parser",
    }

    def __post_init__(self) -> None:
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"device: '{self.device}' is not one of auto, cpu, cuda, cuda:N")
        from .executors.base import executor_names

        if self.executor not in executor_names():
            raise ConfigError(f"executor: '{self.executor}' is not one of {', '.join(executor_names())}")
        for key in ("tool_parser", "reasoning_parser"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or self.backend != "llm"):
                raise ConfigError(f"{key}: a parser's name, for backend llm only, got {value!r}"
                                  f"{'' if self.backend == 'llm' else f' for backend {self.backend}'}")

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "ModelConfig":
        if data is None:
            data = {}
        _check_keys("model.yaml", data, cls.KEYS)
        if "backend" not in data:
            raise ConfigError("model.yaml: missing key 'backend'")
        if "name" in data and data["name"] != name:
            raise ConfigError(f"model.yaml: name '{data['name']}' differs from the folder name '{name}'")
        options = data.get("backend_options", {}) or {}
        if not isinstance(options, dict):
            raise ConfigError("backend_options: expected a mapping")
        engine = data.get("engine", {}) or {}
        if not isinstance(engine, dict):
            raise ConfigError("engine: expected a mapping")
        labels = data.get("labels")
        if labels is not None and not isinstance(labels, str):
            raise ConfigError("labels: expected a file name relative to the model folder")
        return cls(
            name=name,
            backend=str(data["backend"]),
            device=str(data.get("device", "auto")),
            instances=_int("instances", data.get("instances", 1), 1),
            max_batch_size=_int("max_batch_size", data.get("max_batch_size", 0), 0),
            batching=BatchingConfig.from_dict(data.get("batching")),
            inputs=_tensor_specs("inputs", data.get("inputs")),
            outputs=_tensor_specs("outputs", data.get("outputs")),
            labels=labels,
            version_policy=VersionPolicy.from_value(data.get("version_policy")),
            backend_options=dict(options),
            warmup=bool(data.get("warmup", True)),
            engine=dict(engine),
            steps=tuple(data.get("steps") or ()),
            executor=str(data.get("executor", "local")),
            executor_options=dict(data.get("executor_options") or {}),
            tool_parser=data.get("tool_parser"),
            reasoning_parser=data.get("reasoning_parser"),
        )


CONFIG_FILE = "model.yaml"


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model '{model_dir.name}': {path} is missing") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"model '{model_dir.name}': {path} is not valid YAML: {e}") from None
    try:
        return ModelConfig.from_dict(model_dir.name, raw)
    except ConfigError as e:
        raise ConfigError(f"model '{model_dir.name}': {path}: {e.message}") from None


def list_versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


@dataclass(frozen=True)
class ServerConfig:
    """Server settings; CLI flags map 1:1 to fields, environment variables use the RTSERVE_ prefix.

    timeout_keep_alive: seconds an idle keep-alive connection stays open between requests.
    timeout_header: seconds a request's line and headers may take to arrive, from the connection's
        opening or the request's first byte; then the connection is closed (408 if part of a
        request came). uvicorn has no such setting: ``server/http_protocol.py`` adds it.
    limit_concurrency: None = no limit. Otherwise uvicorn's limit_concurrency: a request is answered
        503 (and its connection closed) when the open connections, this one included, or the
        requests in progress number ``limit_concurrency``; idle keep-alive connections count.
    """

    repository: str = "model_repository"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    protect_inference: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    shutdown_timeout_s: float = 30.0
    log_level: str = "info"
    #: serve model files that are symlinks to places outside the repository (paths.confined)
    allow_symlinks: bool = False
    timeout_keep_alive: float = 30.0
    timeout_header: float = 60.0
    limit_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not in 0..65535")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes: {self.max_body_bytes} is below 1024")
        for key in ("timeout_keep_alive", "timeout_header"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be a number of seconds > 0, got {getattr(self, key)!r}")
        if self.limit_concurrency is not None and self.limit_concurrency < 2:
            raise ConfigError(f"limit_concurrency: must be at least 2 (the requesting connection counts, so 1 "
                              f"would refuse every request), got {self.limit_concurrency}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerConfig":
        """Defaults, then RTSERVE_* environment variables, then explicit overrides (CLI flags)."""
        env = os.environ
        kw: dict[str, Any] = {}
        for f in fields(cls):
            var = "RTSERVE_" + f.name.upper()
            raw = env.get(var)
            if raw is None:
                continue
            kind = str(f.type).removesuffix(" | None")
            try:
                if kind == "int":
                    kw[f.name] = int(raw)
                elif kind == "float":
                    kw[f.name] = float(raw)
                elif kind == "bool":
                    kw[f.name] = raw.lower() in ("1", "true", "yes", "on")
                else:
                    kw[f.name] = raw
            except ValueError:
                raise ConfigError(f"{var}: '{raw}' is not {'an integer' if kind == 'int' else 'a number'}") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)
