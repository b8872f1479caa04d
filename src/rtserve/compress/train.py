"""The training loop behind fine-tuning (after pruning) and knowledge distillation.

Distillation loss (Hinton et al.): ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
+ (1 - alpha) * cross_entropy(student, labels)``; the T^2 keeps the soft term's gradients on the
scale of the hard term's as T grows. Without labels only the soft term is used; without a teacher,
plain cross-entropy. Logits of any rank are flattened to (rows, classes), so token-level LM
distillation uses the same loss with (batch * positions) rows.

Resumable: with ``checkpoint_dir`` the model (safetensors), the optimizer state (``torch.save``, read
back with ``weights_only=True``) and the epoch are written after every epoch, and a later call with
the same directory continues from there.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7            # weight of the soft (teacher) term
    seed: int = 0
    checkpoint_dir: Path | None = None
    progress: bool = True


@dataclass
class TrainResult:
    epochs_run: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)  # mean loss per epoch run
    seconds: float = 0.0


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                 temperature: float, alpha: float) -> torch.Tensor:
    s = student.reshape(-1, student.shape[-1])
    if teacher is None:
        return F.cross_entropy(s, labels.reshape(-1))
    t = teacher.reshape(-1, teacher.shape[-1])
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature ** 2
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, labels.reshape(-1))


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, t0: float) -> None:
    """A bar redrawn in place on a terminal; one line per epoch into a log."""
    if not sys.stderr.isatty():
        if step == steps:
            sys.stderr.write(f"epoch {epoch}/{epochs} loss {loss:.4f} {time.perf_counter() - t0:5.1f} s\n")
        return
    width = 24
    done = int(width * step / steps)
    sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] loss {loss:.4f} "
                     f"{time.perf_counter() - t0:5.1f} s")
    if step == steps:
        sys.stderr.write("\n")
    sys.stderr.flush()


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
        teacher: torch.nn.Module | None = None, cfg: TrainConfig | None = None) -> TrainResult:
    """Train ``model`` on inputs ``x`` (and labels ``y``), distilling from ``teacher`` when given."""
    cfg = cfg or TrainConfig()
    if y is None and teacher is None:
        raise ValueError("training needs labels, a teacher, or both")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = 0
    ck = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ck is not None and (ck / "state.json").is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ck / "model.safetensors"))
        opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
        start = json.loads((ck / "state.json").read_text())["epoch"]
    if teacher is not None:
        teacher.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    perms = [torch.randperm(len(x), generator=g) for _ in range(cfg.epochs)]  # same order when resumed
    result = TrainResult(0, start)
    t0 = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        model.train()
        total, steps = 0.0, -(-len(x) // cfg.batch_size)
        for k, i in enumerate(range(0, len(x), cfg.batch_size)):
            b = perms[epoch][i:i + cfg.batch_size]
            with torch.no_grad():
                t_out = teacher(x[b]) if teacher is not None else None
            loss = distill_loss(model(x[b]), t_out, y[b] if y is not None else None, cfg.temperature, cfg.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if cfg.progress:
                _progress(epoch + 1, cfg.epochs, k + 1, steps, total / (k + 1), t0)
        result.losses.append(total / steps)
        result.epochs_run += 1
        if ck is not None:
            from safetensors.torch import save_file

            ck.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ck / "model.safetensors")
            torch.save(opt.state_dict(), ck / "optimizer.pt")
            (ck / "state.json").write_text(json.dumps({"epoch": epoch + 1}))
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
