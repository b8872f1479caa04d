"""``rtserve compress SRC --out DST --quantize METHOD | --prune RATIO | --distill``.

The command reads in three steps (``cmd_compress``): ``select_method`` picks the compression method
(``methods/``: one module per family, a registry by name) from the flag given and the source, its
``prepare`` checks everything and decides the settings without writing a byte (bad input -> exit 2
with the message), and its ``run`` compresses into a temporary folder, measures source and result
side by side, writes ``report.json`` and moves it all into place; the summary is printed last.
"""
from __future__ import annotations

import argparse
import sys

from . import CompressError
from .methods import method_names, select_method
from .onnx_job import DEFAULT_EVAL_SAMPLES
# the ONNX int8 job, re-exported for the tests and benchmarks/compress_digits.py
from .onnx_job import CompressJob, EvalData, _outputs, _session, measure, prepare, run_job  # noqa: F401


def cmd_compress(args: argparse.Namespace) -> int:
    try:
        method = select_method(args)
        outcome = method.run(method.prepare(args))
    except CompressError as e:
        print(f"rtserve compress: {e}", file=sys.stderr)
        return 2
    print(outcome.summary)
    return 0


def add_compress_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compress`` on an ``argparse`` subparsers object (``set_defaults(func=cmd_compress)``)."""
    c = subparsers.add_parser("compress", help="quantize, prune or distill a model; report size, latency, fidelity")
    c.add_argument("src", help="an .onnx file or a repository model folder (--quantize int8-*), a Hugging Face "
                               "decoder folder (--quantize int*-weight), a spec model folder (--prune, --distill)")
    c.add_argument("--out", required=True,
                   help="a repository model folder (-> new version N+1), a folder, or an .onnx file path")
    c.add_argument("--quantize", metavar="METHOD", help=" | ".join(method_names("quantize")))
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
