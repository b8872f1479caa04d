"""``--quantize int8-weight | int4-weight``: weight-only quantization of a Hugging Face decoder
folder for the native engine (``llm_job.py``, ``llm_quant.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import CompressionMethod, CompressionOutcome, register_method


@dataclass(frozen=True)
class LLMQuantJob:
    src: Path
    out: Path
    method: str         # int8-weight | int4-weight
    group_size: int     # int4: weights per scale


@register_method
class LLMWeightQuantization(CompressionMethod):
    name = "llm-weight"
    flag = "quantize"
    names = ("int8-weight", "int4-weight")

    def prepare(self, args) -> LLMQuantJob:
        # the checkpoint and --out are checked by run_llm_quantization before it writes anything
        return LLMQuantJob(Path(args.src), Path(args.out), args.quantize, args.group_size)

    def run(self, job: LLMQuantJob) -> CompressionOutcome:
        from ..llm_job import format_llm_report, run_llm_quantization

        r = run_llm_quantization(job.src, job.out, job.method, job.group_size)
        return CompressionOutcome(r, Path(r["result"]["path"]), f"{format_llm_report(r)}\nwrote {r['result']['path']}")
