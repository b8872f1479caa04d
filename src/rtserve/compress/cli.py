"""``rtserve compress SRC --out DST --quantize METHOD``: validate, quantize, measure, report.

The command reads in three steps (``cmd_compress``): ``prepare`` checks everything and decides the
settings without writing a byte (bad input -> exit 2 with the message), ``run_job`` quantizes into
a temporary folder, measures source and result side by side and writes ``report.json``, then moves
the result into place; the table is printed last.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import CompressError
from .onnx_quant import (METHODS, CalibrationData, InputSpec, QuantPlan, check_feeds, generate_calibration,
                         load_calibration, load_feeds, model_inputs, plan_quantization, quantize_onnx,
                         random_feeds)
from .output import (OutputTarget, is_repository_model, repository_versions, resolve_output,
                     resolve_source)
from .report import (CompressionReport, accuracy, compare_outputs, format_report, machine_info, measure_latency,
                     model_stats, plot_versions, read_report, write_report)

DEFAULT_MAX_BATCH = 64
LLM_METHODS = ("int8-weight", "int4-weight")
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


def cmd_compress(args: argparse.Namespace) -> int:
    chosen = [m for m, on in (("--quantize", args.quantize), ("--prune", args.prune is not None),
                              ("--distill", args.distill)) if on]
    if len(chosen) != 1:
        print("rtserve compress: give exactly one of --quantize, --prune, --distill"
              + (f" (got {', '.join(chosen)}; chain them through repository versions)" if chosen else ""),
              file=sys.stderr)
        return 2
    if args.quantize in LLM_METHODS:
        from .llm_job import format_llm_report, run_llm_quantization

        try:
            r = run_llm_quantization(Path(args.src), Path(args.out), args.quantize, args.group_size)
        except CompressError as e:
            print(f"rtserve compress: {e}", file=sys.stderr)
            return 2
        print(format_llm_report(r))
        print(f"wrote {r['result']['path']}")
        return 0
    if args.distill and (Path(args.src) / "config.json").is_file():  # a causal LM teacher
        return _distill_lm(args)
    if args.prune is not None and (Path(args.src) / "config.json").is_file():
        return _prune_lm(args)
    if args.prune is not None or args.distill:  # PyTorch spec models
        from .torch_jobs import prepare_torch_job as prepare_fn, run_torch_job as run_fn
    else:  # ONNX quantization
        prepare_fn, run_fn = prepare, run_job
    try:
        job = prepare_fn(args)
    except CompressError as e:
        print(f"rtserve compress: {e}", file=sys.stderr)
        return 2
    report, target = run_fn(job)
    print(format_report(report))
    where = f"version {target.version} of {target.path.parent.parent}" if target.version else str(target.path)
    print(f"wrote {where} and {target.report_path}")
    return 0


def _lm_out(out: Path) -> Path | None:
    from .output import is_repository_model, repository_versions

    if is_repository_model(out):
        return out / str((repository_versions(out) or [0])[-1] + 1)
    if out.exists() and any(out.iterdir()):
        print(f"rtserve compress: --out {out} exists and is not empty", file=sys.stderr)
        return None
    return out


def _prune_lm(args) -> int:
    import json
    import shutil

    from .llm_job import compare_lms, params_in
    from .lm_prune import prune_lm

    if not args.structured:
        print("rtserve compress: language models are pruned structurally only (--structured); magnitude pruning "
              "would bring no speedup", file=sys.stderr)
        return 2
    out = _lm_out(Path(args.out))
    if out is None:
        return 2
    try:
        recipe = prune_lm(Path(args.src), out, args.prune, heads=args.prune_heads)
    except CompressError as e:
        print(f"rtserve compress: {e}", file=sys.stderr)
        return 2
    try:
        cmp = compare_lms(Path(args.src), out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    report = {"method": recipe["method"], "recipe": recipe, "source_params": params_in(Path(args.src)),
              "result_params": params_in(out), **cmp,
              "notes": ["pruned without fine-tuning: recover quality with --distill from the original"]}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    f = cmp["fidelity"]
    print(f"pruned {recipe['intermediate_size'][0]} -> {recipe['intermediate_size'][1]} FFN neurons, "
          f"{recipe['attention_heads'][0]} -> {recipe['attention_heads'][1]} heads: {report['source_params']:,} -> "
          f"{report['result_params']:,} parameters; batch-1 decode {cmp['decode_ms'][0]:.2f} -> {cmp['decode_ms'][1]:.2f} "
          f"ms/token; top-1 agreement {f['top1_agreement']:.1%}, mean KL {f['mean_kl']:.3f}\nwrote {out}")
    return 0


def _distill_lm(args) -> int:
    from .lm_distill import distill_lm
    from .train import TrainConfig

    if not args.student or not args.data:
        print("rtserve compress: --distill of a language model needs --student CONFIG.json and --data TEXT|IDS.npz",
              file=sys.stderr)
        return 2
    out = _lm_out(Path(args.out))
    if out is None:
        return 2
    cfg = TrainConfig(epochs=args.epochs or 3, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                      batch_size=16, checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None)
    try:
        r = distill_lm(Path(args.src), Path(args.student), Path(args.data), out, cfg, seq_len=args.seq_len)
    except CompressError as e:
        print(f"rtserve compress: {e}", file=sys.stderr)
        return 2
    f0, f1 = r["fidelity_before"], r["fidelity"]
    print(f"student {r['student_params']:,} parameters (teacher {r['teacher_params']:,}); on held-out text: top-1 "
          f"agreement with the teacher {f0['top1_agreement']:.1%} -> {f1['top1_agreement']:.1%}, mean KL "
          f"{f0['mean_kl']:.3f} -> {f1['mean_kl']:.3f}; next-token accuracy {f1['student_next_token_accuracy']:.1%} "
          f"(teacher {f1['teacher_next_token_accuracy']:.1%})\nwrote {out}")
    return 0


def add_compress_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compress`` on an ``argparse`` subparsers object (``set_defaults(func=cmd_compress)``)."""
    c = subparsers.add_parser("compress", help="quantize, prune or distill a model; report size, latency, fidelity")
    c.add_argument("src", help="an .onnx file or a repository model folder (--quantize int8-*), a Hugging Face "
                               "decoder folder (--quantize int*-weight), a spec model folder (--prune, --distill)")
    c.add_argument("--out", required=True,
                   help="a repository model folder (-> new version N+1), a folder, or an .onnx file path")
    c.add_argument("--quantize", metavar="METHOD", help=" | ".join((*METHODS, *LLM_METHODS)))
    t = c.add_argument_group("pruning and distillation (PyTorch spec models: model.spec.json + model.safetensors)")
    t.add_argument("--prune", type=float, metavar="RATIO", help="share of channels (or weights) to remove")
    t.add_argument("--structured", action="store_true", help="remove whole channels/neurons (real speedup)")
    t.add_argument("--prune-heads", action="store_true", help="language models: prune attention head groups too")
    t.add_argument("--distill", action="store_true", help="train --student on the source's softened outputs")
    t.add_argument("--student", metavar="SPEC.json",
                   help="the student: layers (compress/spec.py), or a Hugging Face config.json for an LM teacher")
    t.add_argument("--data", metavar="FILE.npz", help="training inputs (+ 'labels'): fine-tuning, distillation")
    t.add_argument("--epochs", type=int, help="default: 5 fine-tuning epochs with --data, 30 for distillation")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--temperature", type=float, default=4.0)
    t.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher's soft targets")
    t.add_argument("--checkpoint-dir", help="resumable training checkpoints")
    c.add_argument("--group-size", type=int, default=128, help="int4-weight: weights per scale")
    c.add_argument("--seq-len", type=int, default=128, help="LM distillation: tokens per training sequence")
    calib = c.add_argument_group("calibration (int8-static)")
    calib.add_argument("--calibration", metavar="FILE.npz", help="input name -> array (.npy for one input)")
    calib.add_argument("--calibration-samples", type=int, metavar="N", help="generate N random samples instead")
    c.add_argument("--eval-data", metavar="FILE.npz", help="inputs, and optionally 'labels' for accuracy")
    c.add_argument("--eval-samples", type=int, default=None,
                   help=f"generated inputs for fidelity when no --eval-data (default {DEFAULT_EVAL_SAMPLES})")
    c.add_argument("--max-batch", type=int, help="largest batch timed (default: model.yaml max_batch_size, else 64)")
    c.add_argument("--threads", type=int, help="intra-op threads for both models (default: model.yaml, else 1)")
    c.add_argument("--repeats", type=int, default=50, help="timed runs per model and batch size")
    c.add_argument("--plot", metavar="PATH.png", help="latency vs fidelity of every version with a report")
    c.set_defaults(func=cmd_compress)
    return c


def main_for_tests(argv: list[str]) -> int:
    """``rtserve compress ...`` without the rest of the CLI (tests; argv excludes 'compress')."""
    p = argparse.ArgumentParser(prog="rtserve")
    add_compress_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["compress", *argv])
    return args.func(args)


__all__ = ["add_compress_parser", "cmd_compress", "main_for_tests", "prepare", "run_job"]
