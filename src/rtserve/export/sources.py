"""What ``rtserve convert`` converts from: ``source_kind`` names a source, and ``SOURCES[kind]``
loads it as a ``LoadedSource`` (tensor names, sample inputs at several batch sizes, the source's own
outputs on them, and for torch sources the module, example inputs and dynamic shapes to export).

Kinds: ``hf-encoder`` (a Hugging Face BERT folder: our ``BertModel`` with its pooling, so the result
outputs the sentence embedding a server needs), ``spec`` (a PyTorch spec model folder, ``spec/``),
``pt2`` (a ``torch.export`` program) and ``onnx``. A loader is ``fn(src, fixed_batch) -> LoadedSource``
under ``@register_source(kind)``; ``fixed_batch`` (a target that fixes the batch in its file) makes
every sample that size.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .runners import run_onnx, run_torch
from .targets.base import ConversionError, LoadedSource

BATCHES = (1, 3, 8)  # sample batch sizes when the target's batch axis is dynamic

SourceLoader = Callable[[Path, "int | None"], LoadedSource]
SOURCES: dict[str, SourceLoader] = {}


def register_source(kind: str) -> Callable[[SourceLoader], SourceLoader]:
    def add(fn: SourceLoader) -> SourceLoader:
        SOURCES[kind] = fn
        return fn
    return add


def source_kind(src: Path) -> str:
    if src.is_dir() and (src / "model.spec.json").is_file():
        return "spec"  # a PyTorch spec model (spec/model.py)
    if src.is_dir():
        cfg = src / "config.json"
        if not cfg.is_file():
            raise ConversionError(f"{src}: a folder source needs a Hugging Face config.json")
        c = json.loads(cfg.read_text())
        if c.get("model_type") == "bert" or "BertModel" in (c.get("architectures") or []):
            return "hf-encoder"
        raise ConversionError(f"{src}: model type {c.get('model_type') or c.get('architectures')} cannot be "
                              "converted (supported folders: BERT encoders; decoders are served natively by "
                              "backend: llm)")
    if not src.is_file():
        raise ConversionError(f"{src} does not exist")
    if src.suffix == ".pt2":
        return "pt2"
    if src.suffix == ".onnx":
        return "onnx"
    raise ConversionError(f"{src}: unknown source format '{src.suffix}' (a Hugging Face folder, .pt2 or .onnx)")


def _batches(fixed_batch: int | None) -> tuple[int, ...]:
    return (fixed_batch,) * len(BATCHES) if fixed_batch else BATCHES


def _torch_example(samples, names: list[str], index: int = 1) -> tuple:
    import torch

    return tuple(torch.from_numpy(samples[index][n]) for n in names)


# -- hf-encoder ----------------------------------------------------------------------------------
def _encoder_module(src: Path):
    """Our BERT + its pooling as one module: (input_ids, attention_mask) int64 -> sentence_embedding (B, H)."""
    import torch

    from ..llm.models.bert import PoolingConfig, load_bert, pool

    bert = load_bert(src)
    pooling = PoolingConfig.from_dir(src)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.bool()
            return pool(self.bert(input_ids, mask), mask, pooling)

    return Encoder().eval(), bert.config


def _encoder_samples(vocab: int, max_len: int, batches=BATCHES, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches of different sizes and lengths, with padding, so dynamic axes are exercised."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, length in zip(batches, (5, 17, min(64, max_len))):
        ids = rng.integers(1000 if vocab > 2000 else 1, vocab, (batch, length)).astype(np.int64)
        mask = np.ones((batch, length), np.int64)
        for i in range(1, batch):  # ragged: later rows are padded
            mask[i, length - i * length // (2 * batch):] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@register_source("hf-encoder")
def load_encoder(src: Path, fixed_batch: int | None = None) -> LoadedSource:
    import torch

    module, cfg = _encoder_module(src)
    names, outs = ["input_ids", "attention_mask"], ["sentence_embedding"]
    samples = _encoder_samples(cfg.vocab_size, cfg.max_position_embeddings, _batches(fixed_batch))
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=2, max=cfg.max_position_embeddings)
    return LoadedSource(src, "hf-encoder", names, outs, samples, run_torch(module, samples, names), module,
                        _torch_example(samples, names), ({0: batch, 1: seq}, {0: batch, 1: seq}))


# -- spec ----------------------------------------------------------------------------------------
@register_source("spec")
def load_spec(src: Path, fixed_batch: int | None = None) -> LoadedSource:
    import torch

    from ..spec.model import load_spec_model

    try:
        sm = load_spec_model(src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    names, outs = [sm.input_name], [sm.output_name]
    rng = np.random.default_rng(0)
    samples = [{sm.input_name: rng.random((b, *sm.input_shape), dtype=np.float32)} for b in _batches(fixed_batch)]
    batch = torch.export.Dim("batch", min=1, max=4096)
    return LoadedSource(src, "spec", names, outs, samples, run_torch(sm.model, samples, names), sm.model,
                        (sm.example(),), ({0: batch},))


# -- pt2 -----------------------------------------------------------------------------------------
def pt2_meta(src: Path):
    import torch

    from ..backends.torch import META_FILE

    extra = {META_FILE: ""}
    ep = torch.export.load(str(src), extra_files=extra)
    meta = json.loads(extra[META_FILE]) if extra.get(META_FILE) else {}
    ins = meta.get("inputs") or [f"input_{i}" for i in range(len(ep.graph_signature.user_inputs))]
    outs = meta.get("outputs") or [f"output_{i}" for i in range(len(ep.graph_signature.user_outputs))]
    return ep, ins, outs


def _pt2_samples(ep, names: list[str], batches=BATCHES, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs shaped like the program's example inputs, at batch sizes 1, 3 and 8."""
    rng = np.random.default_rng(seed)
    specs = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in
             {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}]
    out = []
    for batch in batches:
        feeds = {}
        for name, val in zip(names, specs):
            shape = (batch, *[int(d) for d in val.shape[1:]])
            if val.dtype.is_floating_point:
                feeds[name] = rng.random(shape, dtype=np.float32)
            else:
                feeds[name] = rng.integers(0, 2, shape).astype(np.int64)
        out.append(feeds)
    return out


@register_source("pt2")
def load_pt2(src: Path, fixed_batch: int | None = None) -> LoadedSource:
    import torch

    ep, names, outs = pt2_meta(src)
    samples = _pt2_samples(ep, names, _batches(fixed_batch))
    batch = torch.export.Dim("batch", min=1, max=4096)
    return LoadedSource(src, "pt2", names, outs, samples, run_torch(ep.module(), samples, names), ep.module(),
                        _torch_example(samples, names), tuple({0: batch} for _ in names))


# -- onnx ----------------------------------------------------------------------------------------
@register_source("onnx")
def load_onnx(src: Path, fixed_batch: int | None = None) -> LoadedSource:
    """Names from the model, samples from its declared shapes (symbolic dims: the batch for the
    first, 16 for the others)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    samples = []
    for batch in _batches(fixed_batch):
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else (batch if k == 0 else 16) for k, d in enumerate(i.shape)]
            if "float" in i.type:
                feeds[i.name] = rng.random(shape, dtype=np.float32)
            else:
                feeds[i.name] = rng.integers(0, 2, shape).astype(np.int64)
        samples.append(feeds)
    names, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    return LoadedSource(src, "onnx", names, outs, samples, run_onnx(src, samples))
