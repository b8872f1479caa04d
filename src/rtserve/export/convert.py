"""``rtserve convert``: turn a model into another format, and prove the result computes the same.

Sources: a Hugging Face encoder folder (BERT / sentence-transformers, our own ``BertModel`` with its
pooling, so the exported model outputs the sentence embedding a server needs), a ``.pt2`` program,
or an ONNX file. Targets: ONNX (the ``torch.export``-based exporter, batch and sequence axes
dynamic), ``.pt2``, and optimized ONNX (ONNX Runtime's offline graph optimization, transformer
fusions for BERT-like graphs, optional fp16 weights for GPUs).

Every conversion is verified: source and result run on the same sample inputs (several batch sizes
and sequence lengths) and a mismatch beyond tolerance is a ``ConversionError`` with the figures; the
converted file is only written in place once it has passed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TARGETS = ("onnx", "pt2", "tflite")


class ConversionError(ValueError):
    """Bad input, or a converted model that does not compute what its source does."""


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
    source_kind: str        # hf-encoder | pt2 | onnx
    target: str
    output: str
    input_names: list[str]
    output_names: list[str]
    verification: Verification
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def source_kind(src: Path) -> str:
    if src.is_dir() and (src / "model.spec.json").is_file():
        return "spec"  # a PyTorch spec model (compress/torch_model.py)
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


# -- sources as torch callables ------------------------------------------------------------------
class _EncoderForExport:
    """Our BERT + its pooling as one module: (input_ids, attention_mask) int64 -> sentence_embedding (B, H)."""

    @staticmethod
    def build(src: Path):
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


def _encoder_samples(vocab: int, max_len: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches of different sizes and lengths, with padding, so dynamic axes are exercised."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, length in ((1, 5), (3, 17), (8, min(64, max_len))):
        ids = rng.integers(1000 if vocab > 2000 else 1, vocab, (batch, length)).astype(np.int64)
        mask = np.ones((batch, length), np.int64)
        for i in range(1, batch):  # ragged: later rows are padded
            mask[i, length - i * length // (2 * batch):] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def pt2_meta(src: Path):
    import torch

    from ..backends.torch import META_FILE

    extra = {META_FILE: ""}
    ep = torch.export.load(str(src), extra_files=extra)
    meta = json.loads(extra[META_FILE]) if extra.get(META_FILE) else {}
    ins = meta.get("inputs") or [f"input_{i}" for i in range(len(ep.graph_signature.user_inputs))]
    outs = meta.get("outputs") or [f"output_{i}" for i in range(len(ep.graph_signature.user_outputs))]
    return ep, ins, outs


def _pt2_samples(ep, names: list[str], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs shaped like the program's example inputs, at batch sizes 1, 3 and 8."""
    rng = np.random.default_rng(seed)
    specs = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in
             {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}]
    out = []
    for batch in (1, 3, 8):
        feeds = {}
        for name, val in zip(names, specs):
            shape = (batch, *[int(d) for d in val.shape[1:]])
            if val.dtype.is_floating_point:
                feeds[name] = rng.random(shape, dtype=np.float32)
            else:
                feeds[name] = rng.integers(0, 2, shape).astype(np.int64)
        out.append(feeds)
    return out


# -- verification --------------------------------------------------------------------------------
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


def _run_onnx(path: Path, samples, output_names: list[str] | None = None) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(output_names, {k: v for k, v in s.items() if k in names}) for s in samples]


def _run_torch(fn, samples, names: list[str]) -> list[list[np.ndarray]]:
    import torch

    outs = []
    with torch.inference_mode():
        for s in samples:
            y = fn(*[torch.from_numpy(s[n]) for n in names])
            ys = y if isinstance(y, (tuple, list)) else (y,)
            outs.append([t.detach().float().numpy() for t in ys])
    return outs


# -- exporters -----------------------------------------------------------------------------------
def export_program_onnx(module_or_ep, examples: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module_or_ep, examples, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
                          external_data=False)


def _encoder_dims(max_len: int):
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=2, max=max_len)
    return ({0: batch, 1: seq}, {0: batch, 1: seq})


def convert(src: Path | str, target: str, out: Path | str, *, optimize: bool = False, fp16: bool = False,
            atol: float | None = None, via: str = "rtserve", batch: int = 1) -> ConversionResult:
    """Convert ``src`` to ``target`` at ``out`` (a file path), verified. Raises ConversionError.

    TFLite is written ``via`` rtserve's own flatbuffer writer (dynamic batch; Conv2d, Linear,
    pooling, ReLU, Softmax, Flatten) or ``via="litert"``: Google's litert-torch in its own
    environment (more layers; the batch, ``batch``, is fixed in the file)."""
    src, out = Path(src), Path(out)
    if target not in TARGETS:
        raise ConversionError(f"--to '{target}' is not one of {', '.join(TARGETS)}")
    if via not in ("rtserve", "litert"):
        raise ConversionError(f"--via '{via}' is not one of rtserve, litert")
    if via == "litert" and target != "tflite":
        raise ConversionError("--via litert applies to --to tflite only")
    if batch < 1:
        raise ConversionError("--batch must be >= 1")
    kind = source_kind(src)
    if target == "tflite" and kind != "spec":
        raise ConversionError("--to tflite takes a PyTorch spec model folder (model.spec.json + model.safetensors); "
                              "the built-in writer covers Conv2d, Linear, pooling, ReLU, Softmax and Flatten, "
                              "--via litert every spec layer")
    if kind == "onnx" and target != "onnx":
        raise ConversionError("an ONNX source converts only to optimized ONNX (--to onnx --optimize)")
    if kind == "onnx" and not (optimize or fp16):
        raise ConversionError("an ONNX source to ONNX needs --optimize and/or --fp16")
    if fp16 and target != "onnx":
        raise ConversionError("--fp16 applies to ONNX output only")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / (out.name if out.suffix else f"model.{target}")
        if kind == "hf-encoder":
            module, cfg = _EncoderForExport.build(src)
            names, outs = ["input_ids", "attention_mask"], ["sentence_embedding"]
            samples = _encoder_samples(cfg.vocab_size, cfg.max_position_embeddings)
            ex = tuple(__import__("torch").from_numpy(samples[1][n]) for n in names)
            reference = _run_torch(module, samples, names)
            if target == "onnx":
                export_program_onnx(module, ex, staged, names, outs, _encoder_dims(cfg.max_position_embeddings))
            else:
                _save_pt2(module, ex, staged, names, outs, _encoder_dims(cfg.max_position_embeddings))
        elif kind == "spec":
            names, outs, samples, reference = _convert_spec(src, target, staged, via, batch)
        elif kind == "pt2":
            ep, names, outs = pt2_meta(src)
            samples = _pt2_samples(ep, names)
            reference = _run_torch(ep.module(), samples, names)
            if target == "onnx":
                import torch

                ex = tuple(torch.from_numpy(samples[1][n]) for n in names)
                batch = torch.export.Dim("batch", min=1, max=4096)
                export_program_onnx(ep.module(), ex, staged, names, outs, tuple({0: batch} for _ in names))
            else:
                shutil.copyfile(src, staged)
        else:  # onnx -> optimized onnx
            names, outs, samples = _onnx_io_and_samples(src)
            reference = _run_onnx(src, samples)
            shutil.copyfile(src, staged)
        if optimize or fp16:
            from .optimize import optimize_onnx

            optimize_onnx(staged, staged, fp16=fp16)
        if target == "onnx":
            converted = _run_onnx(staged, samples)
        elif target == "tflite":
            converted = _run_tflite(staged, samples, names)
        else:
            converted = _run_pt2(staged, samples, names)
        tol = atol if atol is not None else (2e-2 if fp16 else 1e-4)
        check = compare(reference, converted, tol)
        if not check.ok:
            raise ConversionError(
                f"the converted model differs from its source: max |difference| {check.max_abs_diff:.3g} > "
                f"tolerance {tol:g} (mean cosine {check.mean_cosine:.6f}, {check.samples} input sets); "
                "nothing was written")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    return ConversionResult(str(src), kind, target + ("+optimized" if optimize else "") + ("+fp16" if fp16 else ""),
                            str(out), names, outs, check, round(time.perf_counter() - t0, 2))


def _save_pt2(module, examples, path: Path, names, outs, dynamic_shapes) -> None:
    import torch

    from ..backends.torch import META_FILE

    ep = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes)
    torch.export.save(ep, str(path), extra_files={META_FILE: json.dumps({"inputs": names, "outputs": outs})})


def _run_pt2(path: Path, samples, names) -> list[list[np.ndarray]]:
    import torch

    return _run_torch(torch.export.load(str(path)).module(), samples, names)


def _onnx_io_and_samples(src: Path):
    """An ONNX model's input/output names and sample inputs from its declared shapes (symbolic
    dims: batch 1/3/8 for the first, 16 for the others)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    samples = []
    for batch in (1, 3, 8):
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else (batch if k == 0 else 16) for k, d in enumerate(i.shape)]
            if "float" in i.type:
                feeds[i.name] = rng.random(shape, dtype=np.float32)
            else:
                feeds[i.name] = rng.integers(0, 2, shape).astype(np.int64)
        samples.append(feeds)
    return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()], samples


def _convert_spec(src: Path, target: str, staged: Path, via: str = "rtserve", batch: int = 1):
    """A spec model to ONNX / .pt2 / .tflite; returns names, outputs, samples and the torch reference."""
    from .tflite_writer import write_tflite
    from .torch_export import export_pt2
    from ..spec.model import load_spec_model
    from .torch_export import export_spec_onnx

    try:
        sm = load_spec_model(src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    names, outs = [sm.input_name], [sm.output_name]
    rng = np.random.default_rng(0)
    batches = (batch,) * 3 if via == "litert" else (1, 3, 8)  # litert-torch fixes the batch in the file
    samples = [{sm.input_name: rng.random((b, *sm.input_shape), dtype=np.float32)} for b in batches]
    reference = _run_torch(sm.model, samples, names)
    if target == "onnx":
        export_spec_onnx(sm, staged)
    elif target == "pt2":
        export_pt2(sm.model, sm.example(), staged, names, outs)
    elif via == "litert":
        _litert_convert(src, staged, batch)
    else:
        try:
            write_tflite(sm.model, sm.example(1), staged, input_name=names[0], output_name=outs[0])
        except ValueError as e:
            raise ConversionError(f"{src}: {e}") from None
    return names, outs, samples, reference


def litert_python() -> Path:
    """The interpreter of litert-torch's own environment: ``RTSERVE_LITERT_PYTHON``, else
    ``.venv-litert/bin/python`` in the working directory (``make litert`` creates it)."""
    return Path(os.environ.get("RTSERVE_LITERT_PYTHON", Path.cwd() / ".venv-litert" / "bin" / "python"))


def _litert_convert(src: Path, staged: Path, batch: int) -> None:
    from . import litert_convert

    py = litert_python()
    if not py.is_file():
        raise ConversionError(f"--via litert needs litert-torch's environment: no interpreter at {py} ("
                              "`make litert` creates .venv-litert; or set RTSERVE_LITERT_PYTHON)")
    proc = subprocess.run([str(py), litert_convert.__file__, str(src), str(staged), "--batch", str(batch),
                           "--no-verify"], capture_output=True, text=True, timeout=900, cwd=staged.parent)
    if proc.returncode != 0:
        raise ConversionError(f"litert-torch failed: {(proc.stderr.strip().splitlines() or ['(no message)'])[-1]}")


def _run_tflite(path: Path, samples, names) -> list[list[np.ndarray]]:
    from ..backends.tflite import TFLiteBackend

    backend = TFLiteBackend(path, "cpu", {}, 1)
    outs = []
    for s in samples:
        res = backend.run({n: s[n] for n in names})
        outs.append([np.asarray(v) for v in res.values()])
    return outs
