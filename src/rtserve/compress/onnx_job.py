"""``rtserve compress SRC --out DST --quantize int8-dynamic|int8-static``: ONNX Runtime's int8
quantization (``onnx_quant.py``) of an ``.onnx`` file or a repository model's latest version.

Two steps: ``prepare`` checks everything and decides the settings without writing a byte (bad input
-> ``CompressError`` with the message), ``run_job`` quantizes into a temporary folder, measures
source and result side by side and writes ``report.json``, then moves the result into place.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import CompressError
from .onnx_quant import (METHODS, CalibrationData, InputSpec, QuantPlan, check_feeds, generate_calibration,
                         load_calibration, load_feeds, model_inputs, plan_quantization, quantize_onnx,
                         random_feeds)
from .output import OutputTarget, is_repository_model, repository_versions, resolve_output, resolve_source
from .report import (CompressionReport, accuracy, compare_outputs, machine_info, measure_latency, model_stats,
                     plot_versions, read_report, write_report)

DEFAULT_MAX_BATCH = 64
DEFAULT_EVAL_SAMPLES = 256


@dataclass(frozen=True)
class EvalData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None      # (N,) class indices, when given
    source: str                    # "file:<path>" | "generated"


@dataclass(frozen=True)
class CompressJob:
    """A validated request: everything ``run_job`` needs, nothing left to check."""

    src: Path
    dst: Path
    plan: QuantPlan
    inputs: list[InputSpec]
    calibration: CalibrationData | None
    eval: EvalData
    max_batch: int
    threads: int
    repeats: int
    plot: Path | None


def _repo_yaml(src: Path) -> dict:
    model_dir = Path(src) if is_repository_model(Path(src)) else None
    if model_dir is None:
        return {}
    import yaml

    try:
        return yaml.safe_load((model_dir / "model.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise CompressError(f"{model_dir / 'model.yaml'}: {e}") from None


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CompressError(f"{name} must be at least 1, got {value}")


def prepare(args: argparse.Namespace) -> CompressJob:
    """Check every input and decide every setting; writes nothing. Raises CompressError."""
    if args.quantize not in METHODS:
        raise CompressError(f"--quantize '{args.quantize}' is not one of {', '.join(METHODS)}")
    for name in ("max_batch", "threads", "calibration_samples", "repeats", "eval_samples"):
        _positive("--" + name.replace("_", "-"), getattr(args, name, None))
    if args.calibration and args.calibration_samples:
        raise CompressError("give --calibration FILE or --calibration-samples N, not both")
    if args.quantize == "int8-dynamic" and (args.calibration or args.calibration_samples):
        raise CompressError("int8-dynamic takes no calibration data (activation ranges are measured at run time)")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise CompressError(f"--plot {args.plot}: expected a .png path")
    src = resolve_source(Path(args.src))
    inputs = model_inputs(src)
    yaml_cfg = _repo_yaml(Path(args.src))

    calibration = None
    if args.calibration:
        calibration = load_calibration(Path(args.calibration), inputs)
    elif args.calibration_samples:
        calibration = generate_calibration(inputs, args.calibration_samples)
    plan = plan_quantization(src, args.quantize, calibration, inputs=inputs)

    if args.eval_data:
        arrays = load_feeds(Path(args.eval_data), inputs, "evaluation")
        n = check_feeds(arrays, inputs, "evaluation", extra=("labels",))
        labels = arrays.pop("labels", None)
        if labels is not None and (labels.shape != (n,) or labels.dtype.kind not in "iu"):
            raise CompressError(f"evaluation data: 'labels' must be {n} integer class indices, "
                                f"got shape {list(labels.shape)} dtype {labels.dtype}")
        evaluation = EvalData(arrays, labels, f"file:{args.eval_data}")
    else:
        evaluation = EvalData(random_feeds(inputs, args.eval_samples or DEFAULT_EVAL_SAMPLES, seed=1), None, "generated")

    fixed = next((i.fixed_batch for i in inputs if i.fixed_batch), None)
    max_batch = fixed or args.max_batch or int(yaml_cfg.get("max_batch_size") or 0) or DEFAULT_MAX_BATCH
    threads = args.threads or int((yaml_cfg.get("backend_options") or {}).get("intra_op_threads") or 1)
    resolve_output(Path(args.out), src.name, create=False)  # raises on an unusable destination
    return CompressJob(src=src, dst=Path(args.out), plan=plan, inputs=inputs, calibration=calibration,
                       eval=evaluation, max_batch=max_batch, threads=threads, repeats=args.repeats or 50,
                       plot=Path(args.plot) if args.plot else None)


def _session(path: Path, threads: int):
    """The session the server would use: rtserve's ONNX backend, CPU, ``threads`` intra-op threads."""
    from ..backends.onnx import OnnxBackend

    return OnnxBackend(path, "cpu", {"intra_op_threads": threads}).session


def _tile(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows from ``arrays``, repeating rows when there are fewer (real data for timing)."""
    n = next(iter(arrays.values())).shape[0]
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in arrays.items()}


def _outputs(session, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The first float output (the one fidelity is measured on) over all rows, ``batch`` at a time."""
    outs = session.get_outputs()
    index = next((i for i, o in enumerate(outs) if "float" in o.type or "double" in o.type), 0)
    n = next(iter(feeds.values())).shape[0]
    parts = [session.run([outs[index].name], {k: v[i:i + batch] for k, v in feeds.items()})[0]
             for i in range(0, n, batch)]
    return np.concatenate(parts).astype(np.float64)


def measure(job: CompressJob, result_path: Path, recipe: dict) -> CompressionReport:
    """Sizes, interleaved latency and fidelity of source and result (both loaded here)."""
    sessions = {"source": _session(job.src, job.threads), "result": _session(result_path, job.threads)}
    timing = job.eval.inputs if job.eval.source != "generated" else (
        job.calibration.arrays if job.calibration and not job.calibration.generated else job.eval.inputs)
    batches = sorted({1, job.max_batch})
    lat = measure_latency(sessions, lambda b: _tile(timing, b), batches=batches, repeats=job.repeats)
    ref = _outputs(sessions["source"], job.eval.inputs, job.max_batch)
    got = _outputs(sessions["result"], job.eval.inputs, job.max_batch)
    src_stats, res_stats = model_stats(job.src), model_stats(result_path)
    src_stats.fidelity, res_stats.fidelity = compare_outputs(ref, ref), compare_outputs(ref, got)
    if job.eval.labels is not None:
        src_stats.fidelity["accuracy"] = accuracy(ref, job.eval.labels)
        res_stats.fidelity["accuracy"] = accuracy(got, job.eval.labels)
    src_stats.latency, res_stats.latency = lat["source"], lat["result"]
    notes = [f"latency: source and result interleaved, {job.repeats} runs per batch size, "
             f"{job.threads} intra-op thread(s), inputs from {'evaluation' if timing is job.eval.inputs else 'calibration'} data"]
    n = next(iter(job.eval.inputs.values())).shape[0]
    notes.append(f"fidelity on {n} {'labelled ' if job.eval.labels is not None else ''}"
                 f"{'generated inputs (weaker than real data)' if job.eval.source == 'generated' else 'samples from ' + job.eval.source[5:]}")
    if job.calibration is not None and job.calibration.generated:
        notes.append(recipe["calibration"]["note"])
    return CompressionReport(method=job.plan.method, recipe=recipe, source=src_stats, result=res_stats,
                             machine=machine_info(job.threads, job.plan.vnni), notes=notes)


def run_job(job: CompressJob) -> tuple[CompressionReport, OutputTarget]:
    """Quantize into a temporary folder, measure, write the report, then move it all into place."""
    target = resolve_output(job.dst, job.src.name)
    try:
        recipe = quantize_onnx(job.src, target.work_path, job.plan.method, job.calibration, plan=job.plan)
        report = measure(job, target.work_path, recipe)
        report.result.path = str(target.path)
        write_report(report, target.work_report_path)
        target.commit()
    finally:
        target.abort()
    if job.plot:
        reports = [report]
        if target.version is not None:  # every version of the model that has a report
            model_dir = target.path.parent.parent
            reports = [read_report(model_dir / str(v) / "report.json") for v in repository_versions(model_dir)
                       if (model_dir / str(v) / "report.json").is_file()]
        plot_versions(reports, job.plot, title=target.path.parent.parent.name if target.version else "")
    return report, target
