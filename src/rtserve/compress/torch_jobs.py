"""``rtserve compress`` for PyTorch spec models (``torch_model.py``): ``--prune RATIO [--structured]``
with optional fine-tuning, and ``--distill --student SPEC.json``. Like the ONNX path: everything is
checked before work starts, the result goes to a temporary folder and is moved into place whole
(a new repository version, with ``model.onnx`` to serve, the spec model to compress further, and
``report.json``), source and result are exported to ONNX and timed side by side, interleaved.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import CompressError
from .output import OutputTarget, resolve_output
from .prune import PruneError, _check, magnitude_prune, structured_prune
from .report import (CompressionReport, Latency, accuracy, compare_outputs, machine_info, measure_latency,
                     model_stats, write_report)
from ..export.torch_export import export_spec_onnx
from ..spec.layers import build_student, param_count
from ..spec.model import SpecModel, load_spec_model, save_spec_model
from .train import TrainConfig, fit


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor
    y: torch.Tensor | None
    source: str


@dataclass(frozen=True)
class TorchJob:
    method: str                      # prune-structured | prune-magnitude | distill
    src: Path
    out: Path
    source: SpecModel
    ratio: float | None
    student: dict | None
    train: Dataset | None
    eval: Dataset | None
    cfg: TrainConfig
    max_batch: int
    threads: int
    repeats: int


def load_dataset(path: str | None, sm: SpecModel, what: str) -> Dataset | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"--{what} {p} does not exist")
    try:
        arrays = dict(np.load(p))
    except (OSError, ValueError) as e:
        raise CompressError(f"--{what} {p}: not a .npz file ({e})") from None
    labels = arrays.pop("labels", None)
    x = arrays.get(sm.input_name) if sm.input_name in arrays else (next(iter(arrays.values())) if len(arrays) == 1 else None)
    if x is None:
        raise CompressError(f"--{what} {p}: needs an array '{sm.input_name}' (and optionally 'labels')")
    if tuple(x.shape[1:]) != sm.input_shape:
        raise CompressError(f"--{what} {p}: inputs of shape {list(x.shape[1:])} per sample; the model takes "
                            f"{list(sm.input_shape)}")
    if labels is not None and len(labels) != len(x):
        raise CompressError(f"--{what} {p}: {len(labels)} labels for {len(x)} inputs")
    return Dataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
                   if labels is not None else None, f"file:{p}")


def prepare_torch_job(args) -> TorchJob:
    """Validate a prune or distill request without writing anything. Raises CompressError."""
    src = Path(args.src)
    sm = load_spec_model(src)
    train = load_dataset(args.data, sm, "data")
    ev = load_dataset(args.eval_data, sm, "eval-data")
    student, ratio = None, None
    if args.distill:
        if args.prune is not None:
            raise CompressError("--distill and --prune: one method per run (chain them through versions)")
        if not args.student:
            raise CompressError("--distill needs --student SPEC.json")
        if train is None:
            raise CompressError("--distill needs --data FILE.npz (inputs; labels optional)")
        try:
            build_student(Path(args.student), sm.example())  # a bad spec fails here, before any work
        except ValueError as e:
            raise CompressError(str(e)) from None
        method = "distill"
        student = {"layers": json.loads(Path(args.student).read_text())["layers"]}
    else:
        ratio = float(args.prune)
        if not 0.0 < ratio < 1.0:
            raise CompressError(f"--prune {ratio}: the ratio must be in (0, 1)")
        method = "prune-structured" if args.structured else "prune-magnitude"
        if args.structured:
            try:
                _check(sm.model, ratio)
            except PruneError as e:
                raise CompressError(str(e)) from None
    if args.epochs is not None and args.epochs < 0:
        raise CompressError("--epochs must be >= 0")
    epochs = args.epochs if args.epochs is not None else (30 if args.distill else (5 if train is not None else 0))
    if epochs and train is None:
        raise CompressError(f"--epochs {epochs}: fine-tuning needs --data FILE.npz")
    if epochs and method != "distill" and train.y is None:
        raise CompressError("fine-tuning after pruning needs 'labels' in --data")
    cfg = TrainConfig(epochs=epochs, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                      checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None)
    resolve_output(Path(args.out), "model.onnx", create=False)  # raises on an unusable --out
    return TorchJob(method, src, Path(args.out), sm, ratio, student, train, ev, cfg,
                    args.max_batch or _yaml_max_batch(src) or 64, args.threads or 1, args.repeats)


def _yaml_max_batch(src: Path) -> int | None:
    """``max_batch_size`` of the repository model a version folder belongs to."""
    y = src.parent / "model.yaml"
    if not y.is_file():
        return None
    import yaml

    v = (yaml.safe_load(y.read_text()) or {}).get("max_batch_size")
    return int(v) if isinstance(v, int) and v > 0 else None


def _session(path: Path, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def run_torch_job(job: TorchJob) -> tuple[CompressionReport, OutputTarget]:
    sm, notes = job.source, []
    recipe: dict = {"method": job.method}
    if job.method == "prune-structured":
        model, layers = structured_prune(sm.model, job.ratio, sm.example())
        recipe.update(ratio=job.ratio, layers=[vars(r) for r in layers], criterion="L2 norm of each filter")
    elif job.method == "prune-magnitude":
        model = build_student({"layers": json.loads((job.src / "model.spec.json").read_text())["layers"]},
                              sm.example())
        model.load_state_dict(sm.model.state_dict())
        recipe.update(ratio=job.ratio, zero_fraction=magnitude_prune(model, job.ratio))
        notes.append("unstructured pruning zeroes weights in place: the dense kernels do the same work, so "
                     "it brings no speedup; only the compressed file size shrinks")
    else:
        torch.manual_seed(job.cfg.seed)
        model = build_student(job.student, sm.example())
        recipe.update(student=job.student, teacher_params=param_count(sm.model), student_params=param_count(model),
                      temperature=job.cfg.temperature, alpha=job.cfg.alpha)
    if job.cfg.epochs:
        tr = job.train
        res = fit(model, tr.x, tr.y, teacher=sm.model if job.method == "distill" else None, cfg=job.cfg)
        recipe.update(epochs=job.cfg.epochs, lr=job.cfg.lr, train_data=tr.source, final_loss=res.losses[-1]
                      if res.losses else None, resumed_from_epoch=res.resumed_from)
    result = SpecModel(model.eval(), sm.input_shape, sm.input_name, sm.output_name)
    target = resolve_output(job.out, "model.onnx")
    try:
        save_spec_model(result, target.work_dir)
        export_spec_onnx(result, target.work_path)
        with tempfile.TemporaryDirectory() as tmp:
            src_onnx = export_spec_onnx(sm, Path(tmp) / "source.onnx")
            report = _measure(job, src_onnx, target.work_path, recipe, notes)
        write_report(report, target.work_report_path)
        target.commit()
        report.result.path = str(target.path)
        write_report(report, target.report_path)
    except BaseException:
        target.abort()
        raise
    return report, target


def _measure(job: TorchJob, src_onnx: Path, out_onnx: Path, recipe: dict, notes: list) -> CompressionReport:
    sessions = {"source": _session(src_onnx, job.threads), "result": _session(out_onnx, job.threads)}
    rng = np.random.default_rng(0)
    ev = job.eval

    def make_inputs(batch: int):
        if ev is not None and len(ev.x) >= batch:
            return {job.source.input_name: ev.x[:batch].numpy()}
        return {job.source.input_name: rng.random((batch, *job.source.input_shape), dtype=np.float32)}

    lat = measure_latency(sessions, make_inputs, batches=(1, job.max_batch), repeats=job.repeats)
    stats = {name: model_stats(p) for name, p in (("source", src_onnx), ("result", out_onnx))}
    feeds = {job.source.input_name: (ev.x.numpy() if ev is not None else rng.random((256, *job.source.input_shape),
                                                                                     dtype=np.float32))}
    outs = {n: s.run(None, feeds)[0] for n, s in sessions.items()}
    for n in sessions:
        stats[n].latency = list(lat[n])
        stats[n].fidelity = compare_outputs(outs["source"], outs[n])
        if ev is not None and ev.y is not None:
            stats[n].fidelity["accuracy"] = accuracy(outs[n], ev.y.numpy())
    stats["source"].path = str(job.src)
    from .onnx_quant import has_vnni

    return CompressionReport(job.method, recipe, stats["source"], stats["result"],
                             machine_info(job.threads, has_vnni()), notes=notes)


__all__ = ["prepare_torch_job", "run_torch_job", "Latency"]
