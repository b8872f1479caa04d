"""Model kinds: the contract every served model version follows, and the registry that picks a
kind from ``model.yaml``'s ``backend:``.

A *kind* is how a model is served: ``tensor`` (a model file run by a backend behind a dynamic
batcher), ``llm`` (the LLM engine), ``embedding`` (a BERT encoder with its own batcher),
``cross_encoder`` (a BERT classifier scoring text pairs, with its own batcher), ``ensemble`` (a
graph of other models' steps). Each kind is one module in this package and one
``@register_kind`` line; nothing outside this registry compares kind names. The server's handlers
decode a request, call one method of the model, and encode its answer:

- ``infer(TensorRequest)``: KServe v2 tensors (tensor models and ensembles),
- ``open_stream(...)``: OpenAI completions and chat (language models),
- ``embed_texts(...)``: OpenAI embeddings (embedding models),
- ``score_pairs(...)``: ``/v1/rerank`` and ``/v1/score`` (cross-encoders).

A kind that does not serve an API inherits the method below, which refuses with a 400 naming the
API that does serve the model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, InvalidInput
from ..paths import check_inside

if TYPE_CHECKING:
    from ..metrics import ServingMetrics


@dataclass(frozen=True)
class OutputRequest:
    """One output a client asks for: as binary data or JSON, raw or as top-``classification``
    ``score:index:label`` strings (Triton's classification extension)."""

    name: str
    binary: bool = False
    classification: int = 0


@dataclass
class TensorRequest:
    """A tensor inference request, whatever protocol carried it."""

    inputs: dict[str, np.ndarray]
    outputs: list[OutputRequest] | None = None  # None: every output
    priority: int | None = None  # None: the model's default
    timeout_s: float | None = None  # None: the model's default


@dataclass
class LoadContext:
    """What a kind may use while it loads: the repository's metric families, a lookup of other
    loaded models (``get_model(name, version)``, raising NotFound) for ensembles, and whether
    files may be symlinks to places outside the repository (``allow_symlinks``)."""

    metrics: ServingMetrics | None = None
    get_model: Callable | None = None
    allow_symlinks: bool = False

    def check_inside(self, model_dir: Path, files) -> None:
        """Refuse (ConfigError naming the file and why) any of ``files`` (paths under ``model_dir``)
        that resolves outside the repository folder, ``model_dir``'s parent. A kind calls this
        before it reads them."""
        check_inside(model_dir.parent, files, self.allow_symlinks)


class ServedModel(ABC):
    """One loaded version of a repository model.

    Lifecycle: ``load`` builds it (in a worker thread; reads files only after
    ``LoadContext.check_inside``; raises ConfigError naming the file and the problem, and any other
    exception is reported by the repository as the model's failure, naming model and version),
    ``start`` starts its serving threads (on the event loop), ``close`` drains what is
    queued (bounded by ``drain_timeout_s``), answers the rest with 503 and releases its runtimes.
    ``release`` frees the runtimes of a version that loaded but was never started.
    """

    #: the kind's name in errors and metadata
    kind: ClassVar[str]
    #: model.yaml ``backend:`` values served by this kind (tensor models: every registered backend)
    backends: ClassVar[tuple[str, ...]] = ()
    #: the API that serves this kind, named when a client uses another one
    api: ClassVar[str]
    #: how errors name the kind: "model 'm' is {described}"
    described: ClassVar[str]
    #: loaded after every other model (its steps name them)
    loads_last: ClassVar[bool] = False
    #: one version built from other models rather than version folders of its own
    versionless: ClassVar[bool] = False
    #: listed by ``/v1/models``
    openai: ClassVar[bool] = False

    name: str
    version: int
    config: ModelConfig
    #: the version that a reload put in this one's place (set by the repository before this one
    #: closes): a request that looked this one up before the swap and reaches it closed is handed on
    #: to the replacement instead of answering 503
    replaced_by: "ServedModel | None" = None

    @classmethod
    def served_backends(cls) -> tuple[str, ...]:
        """The ``backend:`` values this kind serves."""
        return cls.backends

    @classmethod
    @abstractmethod
    def load(cls, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> "ServedModel":
        """Build version ``version`` of the model in ``model_dir`` (``model_dir / str(version)``)."""

    def start(self) -> None:
        """Start serving (called on the event loop once the version is chosen)."""

    async def drain(self, drain_timeout_s: float = 10.0) -> None:
        """Stop taking requests; finish what was accepted within ``drain_timeout_s`` and answer the
        rest (503). Called when the server begins to shut down, before connections are closed."""

    @abstractmethod
    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Finish or answer everything accepted, then release the runtimes."""

    def release(self) -> None:
        """Free the runtimes of a version that was loaded but never started."""

    @abstractmethod
    def metadata(self) -> dict:
        """KServe v2 model metadata."""

    @abstractmethod
    def config_json(self) -> dict:
        """The effective configuration (``GET /v2/models/{m}/config``)."""

    # -- the APIs: a kind overrides the ones it serves ------------------------------------------------
    def wrong_api(self) -> InvalidInput:
        return InvalidInput(f"model '{self.name}' is {self.described}: use {self.api}", param="model")

    def count_rejected(self, reason: str) -> None:
        """A request for this model was refused before it reached it (e.g. a malformed body)."""

    def admit(self) -> None:
        """Refuse at once (QueueFull) when the model cannot take another request: called before a
        request's body is read, so shedding load is cheap."""

    def check_input(self, name: str, datatype: str, shape: list[int]) -> None:
        """Raise InvalidInput (naming the input) unless an input of this name, KServe v2 datatype and
        shape (the batch dimension included) can be given to ``infer``. The protocol calls it before
        it converts the input's data, so an oversized or mis-shaped request costs no conversion;
        ``infer`` still checks the decoded arrays. Default: no check."""

    async def infer(self, request: TensorRequest) -> dict[str, np.ndarray]:
        """Run a tensor request; the requested outputs in order (KServe v2)."""
        raise self.wrong_api()

    def prompt_ids(self, prompt, messages, max_tokens: int | None, stop_token_ids: tuple[int, ...] = (),
                   tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        """A generation request's prompt as checked token ids (completions checks every prompt of a
        request with it before queuing any)."""
        raise self.wrong_api()

    async def open_stream(self, prompt: str | list[int] | None, messages: list | None, params, *,
                          max_tokens_given: bool = False, tools: list[dict] | None = None,
                          template_kwargs: dict | None = None):
        """Start a generation (OpenAI completions and chat; ``tools`` and ``template_kwargs`` go to
        the chat template); an async iterator of deltas."""
        raise self.wrong_api()

    async def embed_texts(self, texts: list[str] | None, token_ids: list[list[int]] | None,
                          dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """Vectors for the inputs and the number of tokens embedded (OpenAI embeddings)."""
        raise self.wrong_api()

    async def score_pairs(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, int]:
        """(N,) float32 relevance scores of (query, document) pairs and the number of tokens scored
        (``/v1/rerank``, ``/v1/score``)."""
        raise self.wrong_api()


KINDS: dict[str, type[ServedModel]] = {}


def register_kind(cls: type[ServedModel]) -> type[ServedModel]:
    """Class decorator: make a kind available under its ``backends``."""
    KINDS[cls.kind] = cls
    return cls


def _import_builtin() -> None:
    # lazily, so that `import rtserve` pulls in no runtime
    if {"tensor", "llm", "embedding", "cross_encoder", "ensemble"} <= KINDS.keys():
        return
    from . import cross_encoder, embedding, ensemble, llm, tensor  # noqa: F401


def kind_for(backend: str) -> type[ServedModel]:
    """The kind that serves ``backend:``; ConfigError listing every backend otherwise."""
    _import_builtin()
    for cls in KINDS.values():
        if backend in cls.served_backends():
            return cls
    known = sorted(b for cls in KINDS.values() for b in cls.served_backends())
    raise ConfigError(f"backend: '{backend}' is not one of {', '.join(known)}")


__all__ = ["KINDS", "LoadContext", "OutputRequest", "ServedModel", "TensorRequest", "kind_for", "register_kind"]
