"""``--prune RATIO [--structured]`` (optionally fine-tuned) and ``--distill --student SPEC.json`` of
a PyTorch spec model folder (``torch_jobs.py``): a new version with ``model.onnx`` to serve."""
from __future__ import annotations

from .base import CompressionMethod, CompressionOutcome, file_outcome, register_method


class _SpecMethod(CompressionMethod):
    """Both spec-model methods share one job: ``prepare_torch_job`` tells them apart by the flag."""

    sources = ("spec",)

    def prepare(self, args):
        from ..torch_jobs import prepare_torch_job

        return prepare_torch_job(args)

    def run(self, job) -> CompressionOutcome:
        from ..torch_jobs import run_torch_job

        return file_outcome(*run_torch_job(job))


@register_method
class SpecPruning(_SpecMethod):
    name = "spec-prune"
    flag = "prune"


@register_method
class SpecDistillation(_SpecMethod):
    name = "spec-distill"
    flag = "distill"
