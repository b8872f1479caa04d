"""``--quantize int8-dynamic | int8-static``: ONNX Runtime's int8 quantization of an ``.onnx`` file
or a repository model's latest version (``onnx_job.py``, ``onnx_quant.py``)."""
from __future__ import annotations

from ..onnx_job import CompressJob, prepare, run_job
from ..onnx_quant import METHODS
from .base import CompressionMethod, CompressionOutcome, file_outcome, register_method


@register_method
class OnnxInt8(CompressionMethod):
    name = "onnx-int8"
    flag = "quantize"
    names = METHODS

    def prepare(self, args) -> CompressJob:
        return prepare(args)

    def run(self, job: CompressJob) -> CompressionOutcome:
        return file_outcome(*run_job(job))
