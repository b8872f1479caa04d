"""What a tensor request gets back: the outputs it asks for, in its order, with labels and
classification applied. Shared by tensor models and ensembles."""
from __future__ import annotations

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec
from .base import OutputRequest

LABEL_OUTPUT = "label"


def classify(scores: np.ndarray, k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    """Triton's classification extension: top-k 'score:index[:label]' strings per batch item."""
    rows = scores.reshape(scores.shape[0] if batched else 1, -1)
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for c, j in enumerate(idx[r]):
            s = f"{rows[r, j]:f}:{j}"
            if labels is not None and j < len(labels):
                s += f":{labels[j]}"
            out[r, c] = s.encode()
    return out if batched else out.reshape(k)


def check_outputs(model_name: str, specs: list[TensorSpec], wanted: list[OutputRequest] | None) -> None:
    """Every requested output exists; classification is not asked of the label output. Checked
    before the request is queued."""
    if wanted is None:
        return
    names = [s.name for s in specs]
    for o in wanted:
        if o.name not in names:
            raise InvalidInput(f"model '{model_name}': unknown output '{o.name}'; outputs are {names}")
        if o.classification and o.name == LABEL_OUTPUT:
            raise InvalidInput(f"output '{o.name}' holds labels already; classification applies to score outputs")


def select_outputs(outputs: dict[str, np.ndarray], specs: list[TensorSpec], wanted: list[OutputRequest] | None,
                   labels: list[str] | None, batched: bool) -> dict[str, np.ndarray]:
    """The requested outputs in request order (every output, in the model's order, when none is
    named), classified where asked."""
    if wanted is None:
        return {s.name: outputs[s.name] for s in specs}
    return {o.name: classify(outputs[o.name], o.classification, labels, batched) if o.classification
            else outputs[o.name] for o in wanted}
