"""``--to tflite`` from a PyTorch spec model, written ``--via rtserve`` (rtserve's own flatbuffer
writer, ``tflite_writer.py``: dynamic batch; Conv2d, Linear, pooling, ReLU, Softmax, Flatten) or
``--via litert`` (Google's litert-torch in its own environment, ``litert_convert.py``: more layers;
the batch, ``--batch``, is fixed in the file). Run for verification by rtserve's TFLite backend."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from .base import ConversionError, ConversionOptions, ConversionTarget, LoadedSource, register_target


def litert_python() -> Path:
    """The interpreter of litert-torch's own environment: ``RTSERVE_LITERT_PYTHON``, else
    ``.venv-litert/bin/python`` in the working directory (``make litert`` creates it)."""
    return Path(os.environ.get("RTSERVE_LITERT_PYTHON", Path.cwd() / ".venv-litert" / "bin" / "python"))


def _litert_convert(src: Path, staged: Path, batch: int) -> None:
    from .. import litert_convert

    py = litert_python()
    if not py.is_file():
        raise ConversionError(f"--via litert needs litert-torch's environment: no interpreter at {py} ("
                              "`make litert` creates .venv-litert; or set RTSERVE_LITERT_PYTHON)")
    proc = subprocess.run([str(py), litert_convert.__file__, str(src), str(staged), "--batch", str(batch),
                           "--no-verify"], capture_output=True, text=True, timeout=900, cwd=staged.parent)
    if proc.returncode != 0:
        raise ConversionError(f"litert-torch failed: {(proc.stderr.strip().splitlines() or ['(no message)'])[-1]}")


@register_target
class TFLiteTarget(ConversionTarget):
    name = "tflite"
    sources = ("spec",)
    sources_error = ("--to tflite takes a PyTorch spec model folder (model.spec.json + model.safetensors); "
                     "the built-in writer covers Conv2d, Linear, pooling, ReLU, Softmax and Flatten, "
                     "--via litert every spec layer")
    vias = ("rtserve", "litert")

    def fixed_batch(self, options: ConversionOptions) -> int | None:
        return options.batch if options.via == "litert" else None

    def write(self, source: LoadedSource, path: Path, options: ConversionOptions) -> None:
        if options.via == "litert":
            _litert_convert(source.path, path, options.batch)
            return
        from ..tflite_writer import write_tflite

        example = source.example[0][:1]  # batch 1: the writer makes the batch axis dynamic
        try:
            write_tflite(source.module, example, path, input_name=source.input_names[0],
                         output_name=source.output_names[0])
        except ValueError as e:
            raise ConversionError(f"{source.path}: {e}") from None

    def run(self, path, samples, names):
        from ...backends.tflite import TFLiteBackend

        backend = TFLiteBackend(path, "cpu", {}, 1)
        outs = []
        for s in samples:
            res = backend.run({n: s[n] for n in names})
            outs.append([np.asarray(v) for v in res.values()])
        return outs
