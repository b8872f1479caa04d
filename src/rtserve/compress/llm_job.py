"""``rtserve compress HF_DECODER_FOLDER --quantize int8-weight|int4-weight --out DST``: weight-only
quantization of a native-engine checkpoint (``llm_quant.py``), then a report: weight bytes, parameter
count, batch-1 decode latency per token for source and result (same engine, same threads, in turns)
and fidelity over next-token distributions (top-1 agreement and mean KL at every position of the
evaluation texts: Python's own help topics when the model has a tokenizer, random ids otherwise).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import CompressError
from .llm_quant import quantize_checkpoint
from .output import is_repository_model, repository_versions
from .report import mean_kl, top1_agreement


def _texts(n: int) -> list[str]:
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    words = text.split()
    return [" ".join(words[i * 97:i * 97 + 60]) for i in range(n)]


def _position_logits(llm, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of ``ids`` (one prefill, all positions kept)."""
    from ..llm.block_manager import BlockManager
    from ..llm.scheduler import Scheduler, SchedulerConfig
    from ..llm.sequence import Sequence

    runner = llm.runner
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=len(ids)), BlockManager(runner.num_blocks, runner.block_size))
    seq = Sequence(list(ids), max_tokens=1)
    sched.add(seq)
    out = sched.schedule()
    tokens, pos, meta, _ = runner.prepare(out)
    with torch.inference_mode():
        logits = runner.model(tokens, pos, runner.kv_caches, meta, torch.arange(len(ids)))
    sched.abort(seq)
    return logits.float().numpy()


def _decode_ms(llm, prompt: list[int], tokens: int = 32) -> float:
    from ..llm.sampling_params import SamplingParams

    p = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    llm.generate([prompt], p)
    return (time.perf_counter() - t0) / tokens * 1e3


def compare_lms(src: Path, other: Path, texts: int = 16) -> dict:
    """Fidelity of ``other`` against ``src`` (top-1 agreement and mean KL of next-token
    distributions at every position of the evaluation texts) and batch-1 decode ms/token of both."""
    from ..llm.engine import LLM

    base, cand = LLM(src, num_blocks=256), LLM(other, num_blocks=256)
    if base.tokenizer is not None:
        seqs = [base.tokenizer.encode(t)[:128] for t in _texts(texts)]
    else:
        g = np.random.default_rng(0)
        seqs = [g.integers(1, base.runner.config.vocab_size, 64).tolist() for _ in range(texts)]
    a = np.concatenate([_position_logits(base, s) for s in seqs])
    b = np.concatenate([_position_logits(cand, s) for s in seqs])
    lat: dict[str, list[float]] = {"source": [], "result": []}
    for _ in range(3):  # in turns
        lat["source"].append(_decode_ms(base, seqs[0][:16]))
        lat["result"].append(_decode_ms(cand, seqs[0][:16]))
    return {"fidelity": {"positions": int(len(a)), "top1_agreement": top1_agreement(a, b), "mean_kl": mean_kl(a, b)},
            "decode_ms": (float(np.median(lat["source"])), float(np.median(lat["result"]))),
            "device": str(base.runner.device)}


def params_in(path: Path) -> int:
    from ..llm.weights import checkpoint_files
    from safetensors import safe_open

    n = 0
    for f in checkpoint_files(Path(path)):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n += int(np.prod(st.get_slice(k).get_shape()))
    return n


def run_llm_quantization(src: Path, out: Path, method: str, group_size: int, texts: int = 16) -> dict:
    from ..llm.config import DecoderConfig

    try:
        DecoderConfig.from_dir(src)
    except ValueError as e:
        raise CompressError(str(e)) from None
    if is_repository_model(out):
        final = out / str((repository_versions(out) or [0])[-1] + 1)
    else:
        final = out
    if final.exists() and any(final.iterdir()):
        raise CompressError(f"--out {final} exists and is not empty")
    work = Path(tempfile.mkdtemp(prefix=".compress-", dir=final.parent if final.parent.exists() else None))
    try:
        try:
            recipe = quantize_checkpoint(src, work, method, group_size)
        except ValueError as e:
            raise CompressError(str(e)) from None
        cmp = compare_lms(src, work, texts)
        report = {
            "method": method, "recipe": {k: v for k, v in recipe.items() if k != "modules"},
            "source": {"path": str(src), "weight_bytes": recipe["bytes_before"],
                       "decode_ms_per_token_batch1": cmp["decode_ms"][0]},
            "result": {"path": str(final), "weight_bytes": recipe["bytes_after"],
                       "decode_ms_per_token_batch1": cmp["decode_ms"][1]},
            "fidelity": cmp["fidelity"], "device": cmp["device"], "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "notes": [f"batch-1 decode was not faster than the source on {cmp['device']} "
                      f"({cmp['decode_ms'][1]:.2f} against {cmp['decode_ms'][0]:.2f} ms/token): memory at rest "
                      "shrinks; the kernels used are timed per weight shape at load"]
            if cmp["decode_ms"][1] >= cmp["decode_ms"][0] else [],
        }
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.rmdir()
        shutil.move(str(work), final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def format_llm_report(r: dict) -> str:
    s, q, f = r["source"], r["result"], r["fidelity"]
    return (f"{r['method']}: weights {s['weight_bytes'] / 1e6:.1f} MB -> {q['weight_bytes'] / 1e6:.1f} MB "
            f"({s['weight_bytes'] / q['weight_bytes']:.2f}x smaller); batch-1 decode "
            f"{s['decode_ms_per_token_batch1']:.2f} -> {q['decode_ms_per_token_batch1']:.2f} ms/token on {r['device']}; "
            f"top-1 agreement {f['top1_agreement']:.2%}, mean KL {f['mean_kl']:.4f} over {f['positions']} positions")
