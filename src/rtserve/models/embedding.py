"""A repository model served for ``/v1/embeddings`` (``backend: embedding``): a version folder is
a Hugging Face BERT checkpoint folder with ``tokenizer.json`` (and, for sentence-transformers
models, ``modules.json`` + ``1_Pooling/``).

Requests are batched dynamically: the event loop only enqueues a request's token ids and awaits
its future; one worker thread takes everything waiting (up to ``max_batch_size`` inputs), sorts
it by length, pads each chunk to its longest input, runs one forward and answers each request.
Padding is masked, so a vector does not depend on its batch.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.base import check_options, default_threads
from ..config import ModelConfig, torch_device
from ..errors import ConfigError, InvalidInput, QueueFull, RtserveError, Unavailable
from .base import LoadContext, ServedModel, register_kind
from .llm import check_checkpoint

OPTIONS = {"intra_op_threads", "dtype", "max_batch_tokens"}
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 16384  # padded tokens per forward: bounds activation memory
_DTYPES = ("float32", "float16", "bfloat16")
#: the files of a version folder read besides the safetensors files, when present (llm/models/bert.py,
#: the tokenizer, the length limits; modules.json names the pooling folder, checked after it)
READS = ("config.json", "tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json", "modules.json",
         "model.safetensors.index.json")


@dataclass
class EmbedJob:
    """One request in the queue: its inputs' token ids, answered through ``future`` on ``loop``."""

    token_ids: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@register_kind
class EmbeddingModel(ServedModel):
    kind = "embedding"
    described = "an embedding model"
    backends = ("embedding",)
    api = "/v1/embeddings"
    openai = True

    @classmethod
    def load(cls, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> "EmbeddingModel":
        from ..llm.models.bert import PoolingConfig

        try:
            check_checkpoint(ctx, model_dir, version, READS)
            try:
                _, pooling_file = PoolingConfig.modules(model_dir / str(version))
            except ValueError as e:
                raise ConfigError(f"{model_dir / str(version)}: {e}") from None
            ctx.check_inside(model_dir, [pooling_file] if pooling_file is not None else [])
            return cls(config, model_dir, version, ctx.metrics.embedding if ctx.metrics else None)
        except ConfigError as e:
            raise ConfigError(f"model '{config.name}' version {version}: {e.message}") from None

    def __init__(self, config: ModelConfig, model_dir: Path, version: int, metrics=None) -> None:
        import torch
        from tokenizers import Tokenizer

        from ..llm.models.bert import PoolingConfig, load_bert

        check_options("embedding", config.backend_options, OPTIONS)
        opts = config.backend_options
        self.config, self.name, self.version = config, config.name, version
        self.path = model_dir / str(version)
        self.device = device = torch_device(config.device)
        if device == "cpu":
            torch.set_num_threads(int(opts.get("intra_op_threads", default_threads(config.instances))))
        dtype = str(opts.get("dtype", "float32"))
        if dtype not in _DTYPES:
            raise ConfigError(f"backend_options.dtype: '{dtype}' is not one of {', '.join(_DTYPES)}")
        self.max_batch_size = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        self.max_batch_tokens = int(opts.get("max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS))
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"{tok_file} is missing (an embedding model needs its tokenizer)")
        try:
            self.model = load_bert(self.path, getattr(torch, dtype), device)
            self.pooling = PoolingConfig.from_dir(self.path)
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except (ValueError, OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{self.path}: {e}") from None
        # tokenizer.json may carry its own fixed padding/truncation: lengths are ours to check
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_input_tokens = self._max_input_tokens()
        self.metrics = metrics  # EmbeddingMetrics, or None
        self.num_batches = 0  # counters read by the metrics at scrape time
        self.num_inputs = 0
        self._jobs: deque[EmbedJob] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if config.warmup:
            self._run(self.tokenize(["warm up"]))

    def _max_input_tokens(self) -> int:
        """The positions the model has, lowered by ``tokenizer_config.json``'s ``model_max_length``
        and sentence-transformers' ``max_seq_length`` (the length the model was trained for)."""
        limit = self.model.config.max_position_embeddings
        for fname, key in (("tokenizer_config.json", "model_max_length"),
                           ("sentence_bert_config.json", "max_seq_length")):
            f = self.path / fname
            if f.is_file():
                v = json.loads(f.read_text()).get(key)
                if isinstance(v, int) and 0 < v < limit:
                    limit = v
        return limit

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    # -- request side (event loop) ------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def check(self, token_ids: list[list[int]]) -> None:
        """Raises ValueError naming the first input that is too long or has an id out of range."""
        for i, ids in enumerate(token_ids):
            if len(ids) > self.max_input_tokens:
                raise ValueError(f"input[{i}] has {len(ids)} tokens; this model accepts at most "
                                 f"{self.max_input_tokens} tokens per input")
            bad = next((t for t in ids if t >= self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"input[{i}]: token id {bad} is not below the vocabulary size {self.vocab_size}")

    async def embed_texts(self, texts: list[str] | None, token_ids: list[list[int]] | None,
                          dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """Tokenize (or take token ids), check lengths, embed in a shared batch: the vectors and the
        number of tokens embedded. Errors name the request field (``input``, ``dimensions``)."""
        m, t0 = self.metrics, time.perf_counter()
        try:
            if dimensions is not None and dimensions != self.dimensions:
                raise InvalidInput(f"'dimensions' must be {self.dimensions} for model '{self.name}' (its vectors "
                                   "are not trained to be truncated)", param="dimensions")
            try:
                ids = self.tokenize(texts) if texts is not None else token_ids
                self.check(ids)
            except ValueError as e:
                raise InvalidInput(str(e), param="input") from None
            vectors = await self.embed(ids)
        except RtserveError:
            if m:
                m.requests.labels(self.name, "error").inc()
            raise
        num_tokens = sum(len(x) for x in ids)
        if m:
            m.requests.labels(self.name, "success").inc()
            m.prompt_tokens.labels(self.name).inc(num_tokens)
            m.latency.labels(self.name).observe(time.perf_counter() - t0)
        return vectors, num_tokens

    async def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        """(N, dimensions) float32 vectors, one per input, computed in a shared batch."""
        loop = asyncio.get_running_loop()
        job = EmbedJob(token_ids, loop.create_future(), loop)
        with self._cond:
            closed = self._closed
            if not closed and len(self._jobs) >= self.config.batching.max_queue_size:
                raise QueueFull(f"model '{self.name}': the queue is full ({len(self._jobs)} requests waiting)")
            if not closed:
                self._jobs.append(job)
                self._cond.notify()
        if closed:  # after a reload the replacement serves it
            if isinstance(self.replaced_by, EmbeddingModel):
                return await self.replaced_by.embed(token_ids)
            raise Unavailable(f"model '{self.name}' is unloading")
        return await job.future

    # -- worker thread ------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return  # closed and drained
                jobs = [self._jobs.popleft()]
                size = len(jobs[0].token_ids)
                while self._jobs and size + len(self._jobs[0].token_ids) <= self.max_batch_size:
                    size += len(self._jobs[0].token_ids)
                    jobs.append(self._jobs.popleft())
            try:
                vectors = self._run([ids for j in jobs for ids in j.token_ids])
            except Exception as e:  # answer this batch with the error; keep serving
                for j in jobs:
                    j.loop.call_soon_threadsafe(_resolve, j.future, None, e)
                continue
            start = 0
            for j in jobs:
                n = len(j.token_ids)
                j.loop.call_soon_threadsafe(_resolve, j.future, vectors[start:start + n], None)
                start += n

    def _run(self, token_ids: list[list[int]]) -> np.ndarray:
        """Sort by length so padding is small, cut into forwards of at most ``max_batch_size``
        inputs and ``max_batch_tokens`` padded tokens, and put each vector back in input order."""
        import torch

        from ..llm.models.bert import pool

        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        out = np.empty((len(token_ids), self.dimensions), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and end - start < self.max_batch_size
                   and (end - start + 1) * len(token_ids[order[end]]) <= self.max_batch_tokens):
                end += 1
            chunk = order[start:end]
            width = len(token_ids[chunk[-1]])
            ids = torch.full((len(chunk), width), self.model.config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[row, :len(token_ids[i])] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                vec = pool(self.model(ids, mask), mask, self.pooling)
            out[chunk] = vec.cpu().numpy()
            self.num_batches += 1
            self.num_inputs += len(chunk)
            start = end
        return out

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.metrics:
            self.metrics.bind(self)
        self._thread = threading.Thread(target=self._worker, name=f"embed-{self.name}", daemon=True)
        self._thread.start()

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Finish what is queued (bounded by ``drain_timeout_s``), then answer the rest with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, drain_timeout_s)
        with self._cond:
            left, self._jobs = list(self._jobs), deque()
        for j in left:
            j.loop.call_soon_threadsafe(_resolve, j.future, None, Unavailable(f"model '{self.name}' was unloaded"))

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [str(self.version)], "platform": "rtserve_embedding",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, self.dimensions]}]}

    def config_json(self) -> dict:
        return {"name": self.name, "backend": "embedding", "platform": "rtserve_embedding", "device": self.device,
                "max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens,
                "max_input_tokens": self.max_input_tokens, "dimensions": self.dimensions,
                "pooling": {"mode": self.pooling.mode, "normalize": self.pooling.normalize}}


def _resolve(fut: asyncio.Future, result, error: BaseException | None) -> None:
    if fut.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
