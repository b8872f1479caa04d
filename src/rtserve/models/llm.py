"""The ``llm`` kind: a version folder is a Hugging Face checkpoint folder served by the LLM engine;
requests arrive through the OpenAI API. The model turns a request into prompt token ids (chat
template, vocabulary and context checks), streams the engine's deltas, and records its metrics."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from ..config import ModelConfig, torch_device
from ..errors import ConfigError, InvalidInput, RtserveError, TooManyRequests, Unavailable
from ..llm.engine_config import EngineConfig
from .base import LoadContext, ServedModel, register_kind

log = logging.getLogger("rtserve.models")


def failure_error(failure) -> RtserveError:
    """The error a client gets for a request that ended in a ``RequestFailure``."""
    err = RtserveError(failure.message)
    err.status = failure.status
    return err


#: the files of a version folder the engine reads besides the safetensors files, when present
#: (llm/config.py, llm/tokenizer.py, llm/quant_linear.py, llm/weights.py)
ENGINE_READS = ("config.json", "tokenizer.json", "tokenizer_config.json", "quantization.json",
                "model.safetensors.index.json")


def check_checkpoint(ctx: LoadContext, model_dir: Path, version: int, names: tuple[str, ...]) -> list[Path]:
    """Before a checkpoint folder is read: ``names`` (when present), then its safetensors files, must
    resolve inside the repository (``LoadContext.check_inside``). Returns the safetensors files."""
    from ..llm.weights import checkpoint_files

    path = model_dir / str(version)
    ctx.check_inside(model_dir, [path / n for n in names])
    try:
        files = checkpoint_files(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ctx.check_inside(model_dir, files)
    return files


def check_draft_folder(ctx: LoadContext, config: ModelConfig, model_dir: Path, version: int) -> None:
    """``engine.speculative.draft`` (a folder, relative to the version folder) must lie inside the
    model's folder, and its files inside the repository, before the engine reads them."""
    spec = config.engine.get("speculative") if isinstance(config.engine, dict) else None
    if not isinstance(spec, dict) or spec.get("method") != "draft" or not isinstance(spec.get("draft"), str):
        return  # absent, or invalid: EngineConfig names the problem
    version_dir = model_dir / str(version)
    draft = (version_dir / spec["draft"]).resolve()
    if not draft.is_relative_to(model_dir.resolve()):
        raise ConfigError(f"engine.speculative.draft: '{spec['draft']}' resolves outside the model's folder "
                          f"{model_dir.name}/ (a path relative to the version folder, inside the model's folder)")
    if not draft.is_dir():
        raise ConfigError(f"engine.speculative.draft: '{spec['draft']}' is not a folder (from {version_dir})")
    from ..llm.weights import checkpoint_files

    ctx.check_inside(model_dir, [version_dir / spec["draft"] / n for n in ENGINE_READS])
    try:
        ctx.check_inside(model_dir, checkpoint_files(version_dir / spec["draft"]))
    except ValueError as e:
        raise ConfigError(f"engine.speculative.draft: {e}") from None


def _parsers(config: ModelConfig, tokenizer) -> tuple[str | None, str | None]:
    """The tool-call and reasoning parsers' names: model.yaml's (``none``: no parser), else detected
    from the chat template. Their markers are kept in the decoded text (they may be special tokens)."""
    from ..llm.reasoning import REASONING_PARSERS, detect_reasoning_parser
    from ..llm.tool_parsers import TOOL_PARSERS, detect_tool_parser

    template = tokenizer.chat_template if tokenizer is not None else None
    tools = config.tool_parser or detect_tool_parser(template)
    reasoning = config.reasoning_parser or detect_reasoning_parser(template)
    tools, reasoning = (None if name == "none" else name for name in (tools, reasoning))
    for key, name, known in (("tool_parser", tools, TOOL_PARSERS), ("reasoning_parser", reasoning, REASONING_PARSERS)):
        if name is not None and name not in known:
            raise ConfigError(f"{key}: '{name}' is not one of {', '.join(sorted(known))} or none")
        if name is not None and tokenizer is not None:
            tokenizer.keep_special(known[name].markers)
    return tools, reasoning


@register_kind
class LLMModel(ServedModel):
    kind = "llm"
    described = "a language model"
    backends = ("llm",)
    api = "/v1/completions or /v1/chat/completions"
    openai = True

    @classmethod
    def load(cls, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> "LLMModel":
        try:
            check_checkpoint(ctx, model_dir, version, ENGINE_READS)
            check_draft_folder(ctx, config, model_dir, version)
            return cls(config, model_dir, version, ctx.metrics.llm if ctx.metrics else None)
        except ConfigError as e:
            raise ConfigError(f"model '{config.name}' version {version}: {e.message}") from None

    def __init__(self, config: ModelConfig, model_dir: Path, version: int, metrics=None) -> None:
        from ..llm.engine import LLM

        try:
            engine_config = EngineConfig.from_dict(config.engine)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.config, self.name, self.version = config, config.name, version
        self.path = model_dir / str(version)
        self.device = torch_device(config.device)
        self._core = None  # engine_core "process": the engine process, started here (off the event loop)
        try:
            if engine_config.served_core == "process":
                from ..llm.engine_core import ProcessAsyncLLM

                self._core = ProcessAsyncLLM(self.path, dict(config.engine), str(self.device))
                self.llm = self._core.front  # tokenizer, limits, grammar compiler; the weights are over there
            else:
                self.llm = LLM(self.path, engine_config, device=self.device)
        except (ValueError, OSError) as e:  # the files or model.yaml; any other fault is a load error (500)
            raise ConfigError(f"{self.path}: {e}") from None
        self.metrics = metrics  # LLMMetrics, or None
        self.engine = None
        try:
            self.tool_parser, self.reasoning_parser = _parsers(config, self.llm.tokenizer)
        except ConfigError:
            self.release()
            raise

    def start(self) -> None:
        from ..llm.async_engine import AsyncLLM

        if self._core is not None:
            self.engine = self._core
            if self.metrics:
                self.metrics.bind_stats(self.name, self._core, self._core.front.engine_config.speculative is not None)
            return
        self.engine = AsyncLLM(self.llm)
        if self.metrics:
            spec = self.llm.speculator
            self.metrics.bind(self.name, self.llm.scheduler, spec.stats if spec is not None else None)

    async def drain(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests; running ones get up to ``drain_timeout_s`` to finish, the rest a 503."""
        if self.engine is None:
            return
        message = f"model '{self.name}' stopped serving (unload, reload or shutdown) before this request finished"
        failed = await asyncio.to_thread(self.engine.close, drain_timeout_s, message)
        if failed:
            log.warning("model '%s' version %s: %d requests still running after %.1f s were ended with 503",
                        self.name, self.version, failed, drain_timeout_s)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        await self.drain(drain_timeout_s)

    def release(self) -> None:
        if self._core is not None and self.engine is None:  # loaded, never started: stop its engine process
            self._core.shutdown()

    @property
    def max_model_len(self) -> int:
        return self.llm.limits.max_model_len

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    # -- the OpenAI API -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int] | None, messages: list | None, max_tokens: int | None,
                   stop_token_ids: tuple[int, ...] = (), tools: list[dict] | None = None,
                   template_kwargs: dict | None = None) -> list[int]:
        """The prompt's token ids: ``messages`` through the chat template (with ``tools`` and
        ``template_kwargs``), or ``prompt`` as text or ids. Checks the vocabulary (the prompt's ids
        and ``stop_token_ids``) and, when ``max_tokens`` was given, that it fits the context."""
        param = "messages" if messages is not None else "prompt"
        llm = self.llm
        try:
            if messages is not None:
                if llm.tokenizer is None:
                    raise ValueError("this model has no tokenizer, so it cannot chat")
                prompt = llm.tokenizer.apply_chat_template(messages, tools=tools, **(template_kwargs or {}))
            ids = llm.encode(prompt)
            vocab = llm.limits.vocab_size
            if any(t >= vocab for t in ids):
                raise ValueError(f"prompt token ids must be below the vocabulary size {vocab}")
        except ValueError as e:
            raise InvalidInput(str(e), param=param) from None
        over = [t for t in stop_token_ids if t >= vocab]
        if over:  # it could never be sampled: the stop would be silently ignored
            raise InvalidInput(f"stop_token_ids must be below the vocabulary size {vocab}, got {over[0]}",
                               param="stop_token_ids")
        limit = self.max_model_len
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise InvalidInput(f"this model's maximum context is {limit} tokens; the prompt has {len(ids)} and "
                               f"max_tokens asks for {max_tokens} more", param="max_tokens")
        return ids

    def _check_logit_bias(self, logit_bias: tuple[tuple[int, float], ...]) -> None:
        vocab = self.llm.limits.vocab_size
        over = [t for t, _ in logit_bias if t >= vocab]
        if over:  # it names no token: the bias would be silently ignored (and index past the logits)
            raise InvalidInput(f"logit_bias: token ids must be below the vocabulary size {vocab}, got {over[0]}",
                               param="logit_bias")

    async def open_stream(self, prompt: str | list[int] | None, messages: list | None, params, *,
                          max_tokens_given: bool = False, tools: list[dict] | None = None,
                          template_kwargs: dict | None = None) -> AsyncIterator:
        """Queue the request; once its first delta is there (so a request that can never run is a
        400, one refused by admission control a 429, before any response starts), an async iterator
        of its ``StreamDelta``s, timed."""
        from ..llm.async_engine import EngineClosed
        from ..llm.scheduler import Overloaded, RequestTooLarge

        ids = self.prompt_ids(prompt, messages, params.max_tokens if max_tokens_given else None,
                              params.stop_token_ids, tools, template_kwargs)
        self._check_logit_bias(params.logit_bias)
        if params.structured is not None:
            await self.check_structured(params.structured)
        t_arrival = time.perf_counter()
        gen = self.engine.generate(ids, params)
        try:
            first = await gen.__anext__()
        except RequestTooLarge as e:
            await gen.aclose()
            raise InvalidInput(str(e), param="messages" if messages is not None else "prompt") from None
        except EngineClosed as e:
            await gen.aclose()
            raise Unavailable(f"model '{self.name}': {e}") from None
        except Overloaded as e:
            await gen.aclose()
            if self.metrics:
                self.metrics.refused.labels(self.name).inc()
            raise TooManyRequests(str(e), e.retry_after_s) from None
        except BaseException:
            await gen.aclose()
            raise
        if first.failure is not None:  # failed before any output: an HTTP error, not a stream
            await gen.aclose()
            raise failure_error(first.failure)
        return self._timed(first, gen, t_arrival)

    async def check_structured(self, spec) -> None:
        """Compile a request's constraint (through the engine's cache, on a worker thread: a large
        schema takes a while) before it is queued: an invalid one, or a model without a tokenizer,
        is a 400 naming the field."""
        from ..llm.structured import StructuredOutputError

        try:
            await asyncio.to_thread(self.llm.compile_structured, spec)
        except StructuredOutputError as e:
            raise InvalidInput(str(e), param=e.param) from None

    async def _timed(self, first, gen, t_arrival: float):
        """Pass deltas through, recording TTFT, inter-token latency, queue time, e2e and token counts."""
        lm, name = self.metrics, self.name
        last, is_first, d = t_arrival, True, first
        if lm is not None:  # the per-delta series, looked up once per stream rather than per token
            itl, tokens = lm.itl.labels(name), lm.generation_tokens.labels(name)
        try:
            while d is not None:
                if lm is not None:
                    now = time.perf_counter()
                    if d.token_ids:
                        if is_first:
                            lm.ttft.labels(name).observe(now - last)
                            lm.queue.labels(name).observe(d.queue_s)
                        else:  # one gap per delta: a coalesced delta (several tokens) is one gap
                            itl.observe(now - last)
                        is_first, last = False, now
                        tokens.inc(len(d.token_ids))
                    if d.finish_reason is not None:
                        lm.requests.labels(name, d.finish_reason).inc()
                        lm.prompt_tokens.labels(name).inc(d.num_prompt_tokens)
                        lm.e2e.labels(name).observe(now - t_arrival)
                yield d
                d = await anext(gen, None)
        finally:
            await gen.aclose()

    # -- metadata -------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"name": self.name, "versions": [str(self.version)], "platform": "rtserve_llm",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]}

    def config_json(self) -> dict:
        limits = dataclasses.asdict(self.llm.limits)
        del limits["vocab_size"]
        return {"name": self.name, "backend": "llm", "platform": "rtserve_llm", "device": self.device,
                "engine": {**limits,
                           "speculative": dataclasses.asdict(spec) if (spec := self.llm.engine_config.speculative) else None}}
