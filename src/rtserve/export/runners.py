"""Run a model on sample inputs for verification: every result is a list, per input set, of the
outputs as numpy arrays in the model's output order (what ``convert.compare`` takes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def run_onnx(path: Path, samples, output_names: list[str] | None = None) -> list[list[np.ndarray]]:
    """ONNX Runtime on CPU; feeds the session only the inputs it declares."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(output_names, {k: v for k, v in s.items() if k in names}) for s in samples]


def run_torch(fn, samples, names: list[str]) -> list[list[np.ndarray]]:
    """A torch callable taking the inputs positionally in ``names`` order, under inference mode."""
    import torch

    outs = []
    with torch.inference_mode():
        for s in samples:
            y = fn(*[torch.from_numpy(s[n]) for n in names])
            ys = y if isinstance(y, (tuple, list)) else (y,)
            outs.append([t.detach().float().numpy() for t in ys])
    return outs
