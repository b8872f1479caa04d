"""``--to onnx``: the ``torch.export``-based exporter (the source's dynamic axes kept), or an ONNX
source copied; then, with ``--optimize`` / ``--fp16``, ONNX Runtime's offline optimization."""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from ..runners import run_onnx
from .base import ConversionError, ConversionOptions, ConversionTarget, LoadedSource, register_target


def export_program_onnx(module_or_ep, examples: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module_or_ep, examples, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
                          external_data=False)


@register_target
class OnnxTarget(ConversionTarget):
    name = "onnx"
    sources = ("hf-encoder", "spec", "pt2", "onnx")
    takes_onnx_options = True

    def check(self, kind: str, options: ConversionOptions) -> None:
        super().check(kind, options)
        if kind == "onnx" and not (options.optimize or options.fp16):
            raise ConversionError("an ONNX source to ONNX needs --optimize and/or --fp16")

    def write(self, source: LoadedSource, path: Path, options: ConversionOptions) -> None:
        if source.kind == "onnx":
            shutil.copyfile(source.path, path)
        else:
            export_program_onnx(source.module, source.example, path, source.input_names, source.output_names,
                                source.dynamic_shapes)
        if options.optimize or options.fp16:
            from ..optimize import optimize_onnx

            optimize_onnx(path, path, fp16=options.fp16)

    def run(self, path, samples, names):
        return run_onnx(path, samples)
