"""``rtserve convert``: turn a model into another format, and prove the result computes the same.

Sources (``sources.py``): a Hugging Face encoder folder (BERT / sentence-transformers, our own
``BertModel`` with its pooling, so the exported model outputs the sentence embedding a server needs),
a PyTorch spec model folder, a ``.pt2`` program, or an ONNX file. Targets (``targets/``, one module
each, registered in ``TARGETS``): ONNX (the ``torch.export``-based exporter, batch and sequence axes
dynamic; optimized ONNX: ONNX Runtime's offline graph optimization, transformer fusions for BERT-like
graphs, optional fp16 weights for GPUs), ``.pt2``, and TFLite.

Every conversion is verified: source and result run on the same sample inputs (several batch sizes
and sequence lengths) and a mismatch beyond tolerance is a ``ConversionError`` with the figures; the
converted file is only written in place once it has passed.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .sources import SOURCES, pt2_meta, source_kind
from .targets import TARGETS, ConversionError, ConversionOptions, target_for
from .targets.onnx import export_program_onnx
from .targets.tflite import litert_python

__all__ = ["TARGETS", "ConversionError", "ConversionResult", "Verification", "compare", "convert",
           "export_program_onnx", "litert_python", "pt2_meta", "source_kind"]


@dataclass(frozen=True)
class Verification:
    samples: int            # input sets compared
    max_abs_diff: float     # over every output element
    mean_cosine: float      # row-wise, over every output row
    atol: float
    ok: bool


@dataclass(frozen=True)
class ConversionResult:
    source: str
    source_kind: str        # hf-encoder | spec | pt2 | onnx
    target: str
    output: str
    input_names: list[str]
    output_names: list[str]
    verification: Verification
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def compare(reference: list[list[np.ndarray]], converted: list[list[np.ndarray]], atol: float) -> Verification:
    max_diff, cosines = 0.0, []
    for ref_outs, got_outs in zip(reference, converted):
        for r, g in zip(ref_outs, got_outs):
            r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
            if r.shape != g.shape:
                raise ConversionError(f"output shape {list(g.shape)} differs from the source's {list(r.shape)}")
            max_diff = max(max_diff, float(np.abs(r - g).max()) if r.size else 0.0)
            r2, g2 = r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1), g.reshape(g.shape[0], -1) if g.ndim else g.reshape(1, 1)
            num = (r2 * g2).sum(1)
            den = np.linalg.norm(r2, axis=1) * np.linalg.norm(g2, axis=1)
            cosines.extend(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).tolist())
    cos = float(np.mean(cosines)) if cosines else 1.0
    return Verification(len(reference), max_diff, cos, atol, max_diff <= atol)


def convert(src: Path | str, target: str, out: Path | str, *, optimize: bool = False, fp16: bool = False,
            atol: float | None = None, via: str = "rtserve", batch: int = 1) -> ConversionResult:
    """Convert ``src`` to ``target`` at ``out`` (a file path), verified. Raises ConversionError.

    TFLite is written ``via`` rtserve's own flatbuffer writer (dynamic batch; Conv2d, Linear,
    pooling, ReLU, Softmax, Flatten) or ``via="litert"``: Google's litert-torch in its own
    environment (more layers; the batch, ``batch``, is fixed in the file)."""
    src, out = Path(src), Path(out)
    options = ConversionOptions(optimize=optimize, fp16=fp16, atol=atol, via=via, batch=batch)
    writer = target_for(target, options)
    kind = source_kind(src)
    writer.check(kind, options)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / (out.name if out.suffix else f"model.{writer.name}")
        source = SOURCES[kind](src, writer.fixed_batch(options))
        writer.write(source, staged, options)
        check = compare(source.reference, writer.run(staged, source.samples, source.input_names), options.tolerance)
        if not check.ok:
            raise ConversionError(
                f"the converted model differs from its source: max |difference| {check.max_abs_diff:.3g} > "
                f"tolerance {check.atol:g} (mean cosine {check.mean_cosine:.6f}, {check.samples} input sets); "
                "nothing was written")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    return ConversionResult(str(src), kind, target + ("+optimized" if optimize else "") + ("+fp16" if fp16 else ""),
                            str(out), source.input_names, source.output_names, check,
                            round(time.perf_counter() - t0, 2))
