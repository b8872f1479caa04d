"""``--prune RATIO --structured [--prune-heads]`` and ``--distill --student CONFIG.json --data
TEXT|IDS.npz`` of a Hugging Face decoder folder (``lm_prune.py``, ``lm_distill.py``): a checkpoint
the native engine serves, with ``report.json`` (parameters, fidelity against the source)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import CompressError
from .base import CompressionMethod, CompressionOutcome, register_method


def _lm_out(out: Path) -> Path:
    """A repository model's next version folder, else ``out`` itself, which must be new or empty."""
    from ..output import is_repository_model, repository_versions

    if is_repository_model(out):
        return out / str((repository_versions(out) or [0])[-1] + 1)
    if out.exists() and any(out.iterdir()):
        raise CompressError(f"--out {out} exists and is not empty")
    return out


@dataclass(frozen=True)
class LMPruneJob:
    src: Path
    out: Path
    ratio: float
    heads: bool         # prune attention head groups too


@dataclass(frozen=True)
class LMDistillJob:
    teacher: Path
    student: Path       # a config.json, or a checkpoint folder (e.g. a pruned one)
    data: Path
    out: Path
    cfg: Any            # train.TrainConfig
    seq_len: int


@register_method
class LMPruning(CompressionMethod):
    name = "lm-prune"
    flag = "prune"
    sources = ("hf-decoder",)

    def prepare(self, args) -> LMPruneJob:
        if not args.structured:
            raise CompressError("language models are pruned structurally only (--structured); magnitude "
                                       "pruning would bring no speedup")
        return LMPruneJob(Path(args.src), _lm_out(Path(args.out)), args.prune, args.prune_heads)

    def run(self, job: LMPruneJob) -> CompressionOutcome:
        from ..llm_job import compare_lms, params_in
        from ..lm_prune import prune_lm

        recipe = prune_lm(job.src, job.out, job.ratio, heads=job.heads)
        try:
            cmp = compare_lms(job.src, job.out)
        except BaseException:
            shutil.rmtree(job.out, ignore_errors=True)
            raise
        report = {"method": recipe["method"], "recipe": recipe, "source_params": params_in(job.src),
                  "result_params": params_in(job.out), **cmp,
                  "notes": ["pruned without fine-tuning: recover quality with --distill from the original"]}
        (job.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        f = cmp["fidelity"]
        return CompressionOutcome(report, job.out, (
            f"pruned {recipe['intermediate_size'][0]} -> {recipe['intermediate_size'][1]} FFN neurons, "
            f"{recipe['attention_heads'][0]} -> {recipe['attention_heads'][1]} heads: {report['source_params']:,} -> "
            f"{report['result_params']:,} parameters; batch-1 decode {cmp['decode_ms'][0]:.2f} -> "
            f"{cmp['decode_ms'][1]:.2f} ms/token; top-1 agreement {f['top1_agreement']:.1%}, mean KL "
            f"{f['mean_kl']:.3f}\nwrote {job.out}"))


@register_method
class LMDistillation(CompressionMethod):
    name = "lm-distill"
    flag = "distill"
    sources = ("hf-decoder",)

    def prepare(self, args) -> LMDistillJob:
        from ..train import TrainConfig

        if not args.student or not args.data:
            raise CompressError("--distill of a language model needs --student CONFIG.json and --data "
                                       "TEXT|IDS.npz")
        out = _lm_out(Path(args.out))
        cfg = TrainConfig(epochs=args.epochs or 3, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                          batch_size=16, checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None)
        return LMDistillJob(Path(args.src), Path(args.student), Path(args.data), out, cfg, args.seq_len)

    def run(self, job: LMDistillJob) -> CompressionOutcome:
        from ..lm_distill import distill_lm

        r = distill_lm(job.teacher, job.student, job.data, job.out, job.cfg, seq_len=job.seq_len)
        f0, f1 = r["fidelity_before"], r["fidelity"]
        return CompressionOutcome(r, job.out, (
            f"student {r['student_params']:,} parameters (teacher {r['teacher_params']:,}); on held-out text: top-1 "
            f"agreement with the teacher {f0['top1_agreement']:.1%} -> {f1['top1_agreement']:.1%}, mean KL "
            f"{f0['mean_kl']:.3f} -> {f1['mean_kl']:.3f}; next-token accuracy "
            f"{f1['student_next_token_accuracy']:.1%} (teacher {f1['teacher_next_token_accuracy']:.1%})\n"
            f"wrote {job.out}"))
