"""Token-level knowledge distillation for causal LMs: a smaller Llama-architecture student (its own
``config.json``, same vocabulary) learns the teacher's softened next-token distributions at every
position, plus the true next tokens (``train.distill_loss``). Both run in ``forward_dense`` (plain
causal attention, no KV cache); the student is saved as a Hugging Face checkpoint folder with the
teacher's tokenizer, so the engine serves it directly.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import CompressError
from .report import mean_kl, top1_agreement
from .train import TrainConfig, fit

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def load_dense(path: Path):
    """A checkpoint as a trainable/scorable module (unfused, not prepared for the engine)."""
    from ..llm.config import DecoderConfig
    from ..llm.models.llama import LlamaForCausalLM
    from ..llm.weights import load_weights

    c = DecoderConfig.from_dir(path)
    if c.family == "gpt2":
        raise CompressError("LM distillation supports Llama-family teachers and students")
    with torch.device("meta"):
        m = LlamaForCausalLM(c)
    load_weights(m, path, torch.float32, torch.device("cpu"), m.tied_weights if c.tie_word_embeddings else None)
    m.tie_weights()
    return m.eval()


class _Dense(nn.Module):
    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm.forward_dense(ids)


def token_chunks(data: Path, tokenizer_dir: Path, seq_len: int) -> np.ndarray:
    """(N, seq_len + 1) token ids from a text file (the teacher's tokenizer) or an .npz ``ids`` array."""
    if not data.is_file():
        raise CompressError(f"--data {data} does not exist")
    if data.suffix == ".npz":
        ids = np.load(data).get("ids")
        if ids is None:
            raise CompressError(f"--data {data}: needs an array 'ids' of token ids")
        ids = np.asarray(ids, np.int64).reshape(-1)
    else:
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise CompressError("text --data needs the teacher's tokenizer.json; give token ids as .npz 'ids'")
        from ..llm.tokenizer import Tokenizer

        ids = np.asarray(Tokenizer(tokenizer_dir).encode(data.read_text()), np.int64)
    n = len(ids) // (seq_len + 1)
    if n < 2:
        raise CompressError(f"--data {data}: {len(ids)} tokens, too few for two sequences of {seq_len + 1}")
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def build_student(config_path: Path, vocab: int):
    """A fresh student from a ``config.json``, or, given a checkpoint folder (say, a pruned copy of
    the teacher), that checkpoint as the starting point: distillation then fine-tunes it."""
    from ..llm.config import DecoderConfig
    from ..llm.models.llama import LlamaForCausalLM

    if Path(config_path).is_dir():
        m = load_dense(Path(config_path))
        for p in m.parameters():
            p.requires_grad_(True)
        if m.config.vocab_size != vocab:
            raise CompressError(f"--student {config_path}: vocab_size {m.config.vocab_size} differs from the "
                                f"teacher's {vocab}")
        return m.train(), json.loads((Path(config_path) / "config.json").read_text())
    try:
        d = json.loads(Path(config_path).read_text())
        c = DecoderConfig.from_dict(d)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CompressError(f"--student {config_path}: {e}") from None
    if c.vocab_size != vocab:
        raise CompressError(f"--student {config_path}: vocab_size {c.vocab_size} differs from the teacher's {vocab}")
    if c.family == "gpt2":
        raise CompressError("LM distillation supports Llama-family students")
    m = LlamaForCausalLM(c)
    for mod in m.modules():  # a standard small init (nn.Linear's default is too wide for deep stacks)
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=0.02)
    m.tie_weights()
    return m, d


def _scores(teacher, student, x: torch.Tensor) -> dict:
    with torch.no_grad():
        t = teacher.forward_dense(x[:, :-1]).reshape(-1, teacher.config.vocab_size).numpy()
        s = student.forward_dense(x[:, :-1]).reshape(-1, teacher.config.vocab_size).numpy()
    y = x[:, 1:].reshape(-1).numpy()
    return {"top1_agreement": top1_agreement(t, s), "mean_kl": mean_kl(t, s),
            "teacher_next_token_accuracy": float((t.argmax(1) == y).mean()),
            "student_next_token_accuracy": float((s.argmax(1) == y).mean())}


def distill_lm(teacher_dir: Path, student_config: Path, data: Path, out: Path, cfg: TrainConfig,
               seq_len: int = 128) -> dict:
    teacher_dir, out = Path(teacher_dir), Path(out)
    teacher = load_dense(teacher_dir)
    student, student_cfg = build_student(student_config, teacher.config.vocab_size)
    chunks = torch.from_numpy(token_chunks(Path(data), teacher_dir, seq_len))
    n_eval = max(1, len(chunks) // 10)
    train, held = chunks[:-n_eval], chunks[-n_eval:]
    before = _scores(teacher, student, held)
    torch.manual_seed(cfg.seed)
    res = fit(_Dense(student), train[:, :-1], train[:, 1:], teacher=_Dense(teacher), cfg=cfg)
    after = _scores(teacher, student, held)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in student.state_dict().items()
             if not (student.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    student_cfg = {**student_cfg, "architectures": student_cfg.get("architectures") or ["LlamaForCausalLM"],
                   "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(student_cfg, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (teacher_dir / f).is_file():
            shutil.copyfile(teacher_dir / f, out / f)
    count = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    report = {"method": "distill-lm", "teacher": str(teacher_dir), "student": str(out),
              "teacher_params": count(teacher), "student_params": count(student),
              "recipe": {"temperature": cfg.temperature, "alpha": cfg.alpha, "epochs": cfg.epochs, "lr": cfg.lr,
                         "seq_len": seq_len, "train_sequences": len(train), "eval_sequences": len(held),
                         "data": str(data), "final_loss": res.losses[-1] if res.losses else None},
              "fidelity_before": before, "fidelity": after, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
