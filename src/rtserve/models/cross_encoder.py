"""A repository model served for ``/v1/rerank`` and ``/v1/score`` (``backend: cross_encoder``): a
version folder is a Hugging Face ``BertForSequenceClassification`` checkpoint with one label and
``tokenizer.json`` (what sentence-transformers' ``CrossEncoder`` saves, e.g. ms-marco-MiniLM).

A pair is encoded by the tokenizer's own post-processor as ``[CLS] q [SEP] d [SEP]`` with token
types 0 then 1, truncated "longest first" (the longer of the two loses a token at a time) to the
model's limit, as Hugging Face tokenizers do for sentence-transformers. Scores are the classifier's
logit through the checkpoint's activation (sigmoid unless its config names another), equal to
``CrossEncoder.predict``. Requests are batched dynamically across clients (``encoder_worker``);
padding is masked, so a score does not depend on its batch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..backends.base import check_options, default_threads
from ..config import ModelConfig, torch_device
from ..errors import ConfigError, RtserveError, Unavailable
from .base import LoadContext, ServedModel, register_kind
from .encoder_worker import EncoderWorker, WorkerClosed
from .llm import check_checkpoint

OPTIONS = {"intra_op_threads", "dtype", "max_batch_tokens"}
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 16384  # padded tokens per forward: bounds activation memory
# A forward is cut where padding would exceed both: short pairs still share a forward (its fixed cost
# dominates), long pairs of mixed lengths are not padded to the longest (compute dominates).
MIN_PAD_WASTE, MAX_PAD_FRACTION = 256, 0.25
_DTYPES = ("float32", "float16", "bfloat16")
#: the files of a version folder read besides the safetensors files, when present
READS = ("config.json", "tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json",
         "model.safetensors.index.json")


class EncodedPair(NamedTuple):
    """One (query, document) pair as the model reads it."""

    ids: list[int]
    type_ids: list[int]


def max_input_tokens(path: Path, positions: int) -> int:
    """The positions the model has, lowered by ``tokenizer_config.json``'s ``model_max_length`` and
    ``sentence_bert_config.json``'s ``max_seq_length``: what sentence-transformers truncates to."""
    limit = positions
    for fname, key in (("tokenizer_config.json", "model_max_length"), ("sentence_bert_config.json", "max_seq_length")):
        f = path / fname
        if f.is_file():
            v = json.loads(f.read_text()).get(key)
            if isinstance(v, int) and 0 < v < limit:
                limit = v
    return limit


def pair_tokenizer(tok_file: Path, limit: int):
    """``tokenizer.json`` set to encode pairs truncated to ``limit`` tokens, longest first, unpadded.
    ValueError unless its post-processor makes ``[CLS] q [SEP] d [SEP]`` with both token types."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    tok.no_padding()
    tok.enable_truncation(limit, strategy="longest_first")
    probe = tok.encode("a", "b")
    bare = len(tok.encode("a", add_special_tokens=False).ids) + len(tok.encode("b", add_special_tokens=False).ids)
    if len(probe.ids) < bare + 2 or 1 not in probe.type_ids:
        raise ValueError(f"{tok_file}: its post-processor does not encode a pair as [CLS] q [SEP] d [SEP] with token "
                         "types 0 and 1 (a cross-encoder needs BertProcessing or a TemplateProcessing with a "
                         "'pair' template)")
    return tok


@register_kind
class CrossEncoderModel(ServedModel):
    kind = "cross_encoder"
    described = "a cross-encoder (reranking) model"
    backends = ("cross_encoder",)
    api = "/v1/rerank or /v1/score"
    openai = True

    @classmethod
    def load(cls, config: ModelConfig, model_dir: Path, version: int, ctx: LoadContext) -> "CrossEncoderModel":
        try:
            check_checkpoint(ctx, model_dir, version, READS)
            return cls(config, model_dir, version, ctx.metrics.scoring if ctx.metrics else None)
        except ConfigError as e:
            raise ConfigError(f"model '{config.name}' version {version}: {e.message}") from None

    def __init__(self, config: ModelConfig, model_dir: Path, version: int, metrics=None) -> None:
        import torch

        from ..llm.models.bert_classifier import load_cross_encoder

        check_options("cross_encoder", config.backend_options, OPTIONS)
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
            raise ConfigError(f"{tok_file} is missing (a cross-encoder needs its tokenizer)")
        try:
            self.model = load_cross_encoder(self.path, getattr(torch, dtype), device)
            self.max_input_tokens = max_input_tokens(self.path, self.model.config.encoder.max_position_embeddings)
            self.tokenizer = pair_tokenizer(tok_file, self.max_input_tokens)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{self.path}: {e}") from None
        self.metrics = metrics  # ScoringMetrics, or None
        self.num_batches = 0  # counters read by the metrics at scrape time
        self.num_pairs = 0
        self.worker = EncoderWorker(self.name, self._run, self.max_batch_size, config.batching.max_queue_size)
        if config.warmup:
            self._run(self.encode([("warm", "up")]))

    # -- request side (event loop) ------------------------------------------------------------
    def encode(self, pairs: list[tuple[str, str]]) -> list[EncodedPair]:
        """Each pair as ``[CLS] q [SEP] d [SEP]``, truncated longest first to ``max_input_tokens``."""
        return [EncodedPair(e.ids, e.type_ids) for e in self.tokenizer.encode_batch(pairs)]

    async def score_pairs(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, int]:
        """Encode on the loop, score in a shared batch: (N,) float32 scores and the tokens scored."""
        m, t0 = self.metrics, time.perf_counter()
        encoded = self.encode(pairs)
        try:
            scores = await self.score(encoded)
        except RtserveError:
            if m:
                m.requests.labels(self.name, "error").inc()
            raise
        num_tokens = sum(len(e.ids) for e in encoded)
        if m:
            m.requests.labels(self.name, "success").inc()
            m.tokens.labels(self.name).inc(num_tokens)
            m.latency.labels(self.name).observe(time.perf_counter() - t0)
        return scores, num_tokens

    async def score(self, encoded: list[EncodedPair]) -> np.ndarray:
        try:
            return await self.worker.submit(encoded)
        except WorkerClosed:  # after a reload the replacement serves it
            if isinstance(self.replaced_by, CrossEncoderModel):
                return await self.replaced_by.score(encoded)
            raise Unavailable(f"model '{self.name}' is unloading") from None

    # -- worker thread ------------------------------------------------------------------------
    def _run(self, pairs: list[EncodedPair]) -> np.ndarray:
        """Sort by length so padding is small, cut into forwards of at most ``max_batch_size`` pairs,
        ``max_batch_tokens`` padded tokens and bounded padding, and put each score back in input order."""
        import torch

        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].ids))
        out = np.empty(len(pairs), dtype=np.float32)
        start = 0
        while start < len(order):
            end, real = start + 1, len(pairs[order[start]].ids)
            while end < len(order) and end - start < self.max_batch_size:
                n = len(pairs[order[end]].ids)
                padded = (end - start + 1) * n
                if padded > self.max_batch_tokens or padded - real - n > max(MIN_PAD_WASTE, MAX_PAD_FRACTION * padded):
                    break
                end, real = end + 1, real + n
            chunk = order[start:end]
            width = len(pairs[chunk[-1]].ids)
            ids = torch.full((len(chunk), width), self.model.config.encoder.pad_token_id, dtype=torch.long)
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                n = len(pairs[i].ids)
                ids[row, :n] = torch.tensor(pairs[i].ids)
                types[row, :n] = torch.tensor(pairs[i].type_ids)
                mask[row, :n] = True
            with torch.inference_mode():
                scores = self.model(ids.to(self.device), mask.to(self.device), types.to(self.device))
            out[chunk] = scores.cpu().numpy()
            self.num_batches += 1
            self.num_pairs += len(chunk)
            start = end
        return out

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.metrics:
            self.metrics.bind(self)
        self.worker.start()

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        await self.worker.close(drain_timeout_s)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [str(self.version)], "platform": "rtserve_cross_encoder",
                "inputs": [{"name": "text_pair", "datatype": "BYTES", "shape": [-1, 2]}],
                "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]}]}

    def config_json(self) -> dict:
        c = self.model.config
        return {"name": self.name, "backend": "cross_encoder", "platform": "rtserve_cross_encoder",
                "device": self.device, "max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens,
                "max_input_tokens": self.max_input_tokens, "truncation": "longest_first",
                "activation": c.activation.lower(), "num_labels": c.num_labels}
