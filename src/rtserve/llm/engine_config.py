"""The LLM engine's options: model.yaml's ``engine:`` mapping, one field per key, validated once.

``LLM``, ``ModelRunner`` and ``PipelineRunner`` take an ``EngineConfig``; the repository reads the
mapping with ``EngineConfig.from_dict``. This is the only place the keys are spelled. No torch here:
the server validates a model's config without loading the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .speculative.config import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPU, bfloat16 on CUDA (dtypes.py)
DECODE_KERNELS = ("gather", "triton")
ENGINE_CORES = ("auto", "process", "thread")  # where the served engine steps (engine_core.py, async_engine.py)


@dataclass(frozen=True)
class EngineConfig:
    """``num_blocks`` sizes the KV cache directly; without it ``kv_cache_memory_fraction`` does
    (``cache_size.py``; defaults 0.9 of a GPU, 0.1 of available CPU memory). ``max_model_len``:
    None is the checkpoint's ``max_position_embeddings``. ``decode_kernel`` ("gather" or "triton")
    and ``cuda_graphs``: see ``ModelRunner`` (None: both on for CUDA). ``pipeline_stages`` > 1: the
    layers run in that many worker processes (``PipelineRunner``), each step cut into
    ``pipeline_micro_batches`` groups (None: one per stage) that overlap. ``dtype``: "auto" is
    float32 on a CPU and bfloat16 on CUDA (float16 without bfloat16 support); bfloat16 / float16 on a
    CPU without native instructions for them log a warning (``dtypes.py`` resolves all of it).

    Admission control (``admission.py``): a request is refused at once (429 with ``Retry-After``)
    when the sequences waiting for one of the ``max_num_seqs`` batch slots would pass
    ``max_waiting`` (None: 4 x ``max_num_seqs``; 0: admit only into a free slot), or the prompt
    tokens admitted and not yet started ``max_waiting_tokens`` (None: 8 x
    ``max_num_batched_tokens``); an idle model admits any request. The defaults absorb a burst of
    five batches and bound a new request's wait to about four generations of the running batch, a
    prefill backlog to eight full steps. Under a TTFT target, ``max_waiting: 0`` keeps an admitted
    request's TTFT that of a full batch at any overload; in between, size it by Little's law: about
    the completions per second times the queueing time allowed (``benchmarks/llm_admission.py``).

    ``speculative`` (``{method: ngram | draft, num_tokens: K, draft: path, prompt_lookup_min/max}``):
    speculative decoding (``llm/speculative/``); None: off.

    ``engine_core``: where a served model's engine steps: "process" (``engine_core.ProcessAsyncLLM``:
    a process of its own), "thread" (``async_engine.AsyncLLM``: a thread of the server process), or
    "auto" (the default): the process, except with ``pipeline_stages`` > 1 (whose stage workers are
    processes of the server's). Measured side by side in ``benchmarks/llm_serving.py
    --engine-process``: the process served 1.09-1.19x the thread's tokens/s. Offline ``LLM``
    ignores it."""

    num_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    dtype: str = "auto"
    enable_prefix_caching: bool = True
    kv_cache_memory_fraction: float | None = None
    decode_kernel: str | None = None
    cuda_graphs: bool | None = None
    pipeline_stages: int | None = None
    pipeline_micro_batches: int | None = None
    max_waiting: int | None = None
    max_waiting_tokens: int | None = None
    speculative: SpeculativeConfig | None = None  # a mapping in model.yaml: speculative/config.py
    engine_core: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative", SpeculativeConfig.from_value(self.speculative))
        if self.speculative is not None and self.pipeline_stages and self.pipeline_stages > 1:
            raise ValueError("engine.speculative: not supported with pipeline_stages > 1")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_int(name, getattr(self, name), optional=False)
        for name in ("num_blocks", "max_model_len", "pipeline_stages", "pipeline_micro_batches",
                     "max_waiting_tokens"):
            _check_int(name, getattr(self, name), optional=True)
        _check_int("max_waiting", self.max_waiting, optional=True, minimum=0)
        _check_choice("dtype", self.dtype, DTYPES, optional=False)
        _check_choice("decode_kernel", self.decode_kernel, DECODE_KERNELS, optional=True)
        _check_choice("engine_core", self.engine_core, ENGINE_CORES, optional=False)
        if self.engine_core == "process" and self.pipeline_stages and self.pipeline_stages > 1:
            raise ValueError("engine.engine_core: 'process' is not supported with pipeline_stages > 1")
        _check_bool("enable_prefix_caching", self.enable_prefix_caching, optional=False)
        _check_bool("cuda_graphs", self.cuda_graphs, optional=True)
        f = self.kv_cache_memory_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0):
            raise ValueError(f"engine.kv_cache_memory_fraction: must be a number in (0, 1] or unset, got {f!r}")

    @property
    def served_core(self) -> str:
        """"process" or "thread": ``engine_core`` with "auto" resolved."""
        if self.engine_core != "auto":
            return self.engine_core
        return "thread" if self.pipeline_stages and self.pipeline_stages > 1 else "process"

    @property
    def waiting_limit(self) -> int:
        """``max_waiting``, or its default: 4 x ``max_num_seqs``."""
        return self.max_waiting if self.max_waiting is not None else 4 * self.max_num_seqs

    @property
    def waiting_tokens_limit(self) -> int:
        """``max_waiting_tokens``, or its default: 8 x ``max_num_batched_tokens``."""
        return self.max_waiting_tokens if self.max_waiting_tokens is not None else 8 * self.max_num_batched_tokens

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The field names: model.yaml's ``engine:`` keys."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, raw: dict) -> EngineConfig:
        """The config of a model.yaml ``engine:`` mapping; unset keys keep their defaults.
        Raises ValueError naming an unknown key or a bad value."""
        allowed = cls.keys()
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f"engine: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
        return cls(**raw)


def _check_int(name: str, value, optional: bool, minimum: int = 1) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        unset = " or unset" if optional else ""
        raise ValueError(f"engine.{name}: must be an integer >= {minimum}{unset}, got {value!r}")


def _check_choice(name: str, value, allowed: tuple[str, ...], optional: bool) -> None:
    if (value is None and optional) or value in allowed:
        return
    unset = " (or unset)" if optional else ""
    raise ValueError(f"engine.{name}: '{value}' is not one of {', '.join(allowed)}{unset}")


def _check_bool(name: str, value, optional: bool) -> None:
    if (value is None and optional) or isinstance(value, bool):
        return
    unset = " or unset" if optional else ""
    raise ValueError(f"engine.{name}: must be true or false{unset}, got {value!r}")
