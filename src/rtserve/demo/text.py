"""The demo repository's text pipeline: ``text_topic``, an ensemble text -> ``minilm`` (sentence
embeddings) -> ``topic_head`` (a logistic-regression head in ONNX) -> label. The head is trained at
build time on sentences of Python's own help topics, labelled by what the topic is about:
control flow, data types, or operators and expressions (about a second on a CPU)."""
from __future__ import annotations

import re
from pathlib import Path

TOPICS = {
    "control flow": ["if", "for", "while", "try", "with", "break", "continue", "return", "raise", "pass",
                     "compound", "exceptions", "yield", "async", "await"],
    "data types": ["dict", "lists", "strings", "string-methods", "typesmapping", "typesseq", "typesseq-mutable",
                   "sequence-types", "numbers", "integers", "floating", "imaginary", "numeric-types"],
    "operators and expressions": ["binary", "bitwise", "booleans", "comparisons", "power", "shifting", "unary",
                                  "operator-summary", "lambda", "calls", "slicings", "subscriptions", "exprlists"],
}
ENSEMBLE_YAML = """\
backend: ensemble
max_batch_size: 32
inputs: [{name: text, datatype: BYTES, shape: []}]
outputs:
  - {name: label, datatype: BYTES, shape: []}
  - {name: probabilities, datatype: FP32, shape: [3]}
steps:
  - {name: embed, model: minilm, inputs: {text: text}, outputs: {embedding: embedding}}
  - {name: classify, model: topic_head, inputs: {embedding: embedding}, outputs: {logits: logits, label: label}}
  - {name: probabilities, function: softmax, inputs: {x: logits}, outputs: {y: probabilities}}
"""
HEAD_YAML = """\
backend: onnx
max_batch_size: 32
labels: labels.txt
backend_options: {intra_op_threads: 1}
"""


def sentences() -> tuple[list[str], list[int]]:
    from pydoc_data.topics import topics

    xs, ys = [], []
    for label, (_, keys) in enumerate(TOPICS.items()):
        for k in keys:
            text = re.sub(r"\s+", " ", topics[k])
            for s in re.split(r"(?<=[.!?]) ", text):
                if 6 <= len(s.split()) <= 40 and not re.search(r"[=(){}\[\]*>]|::", s):
                    xs.append(s)
                    ys.append(label)
    return xs, ys


def add_text_pipeline(root: Path, minilm_dir: Path) -> float:
    """Train the head on MiniLM embeddings, write ``topic_head`` and ``text_topic``; returns the
    held-out accuracy of the head."""
    import numpy as np
    import torch

    from ..export.torch_export import export_onnx
    from tokenizers import Tokenizer

    from ..llm.models.bert import PoolingConfig, load_bert, pool

    xs, ys = sentences()
    tok = Tokenizer.from_file(str(minilm_dir / "1" / "tokenizer.json"))
    tok.no_padding()  # the file pads everything to 128 tokens
    tok.no_truncation()
    bert, pooling = load_bert(minilm_dir / "1"), PoolingConfig.from_dir(minilm_dir / "1")
    vecs = []
    with torch.inference_mode():
        for i in range(0, len(xs), 64):
            ids = [tok.encode(s).ids[:256] for s in xs[i:i + 64]]
            n = max(map(len, ids))
            t = torch.tensor([x + [0] * (n - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]).bool()
            vecs.append(pool(bert(t, mask), mask, pooling))
    x = torch.cat(vecs)
    y = torch.tensor(ys)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], len(TOPICS))
    opt = torch.optim.AdamW(head.parameters(), lr=0.02, weight_decay=0.01)
    counts = torch.bincount(y[tr], minlength=len(TOPICS)).float()
    weight = counts.sum() / (len(TOPICS) * counts)  # balanced: the classes differ in size
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[tr] * 10), y[tr], weight=weight).backward()
        opt.step()
    with torch.no_grad():  # fold the input scale into the weights, so the served head takes raw embeddings
        head.weight.mul_(10)
    with torch.no_grad():
        acc = float((head(x[te]).argmax(1) == y[te]).float().mean())  # noqa: the scale is folded in above
    export_onnx(head.eval(), torch.zeros(2, x.shape[1]), root / "topic_head" / "1" / "model.onnx", ["embedding"],
                ["logits"])
    (root / "topic_head" / "model.yaml").write_text(HEAD_YAML)
    (root / "topic_head" / "labels.txt").write_text("\n".join(TOPICS) + "\n")
    (root / "text_topic").mkdir(parents=True, exist_ok=True)
    (root / "text_topic" / "model.yaml").write_text(ENSEMBLE_YAML)
    np.save(root / "topic_head" / "accuracy.npy", np.array(acc))
    return acc
