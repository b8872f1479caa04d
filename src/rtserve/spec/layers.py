"""A student network described as data (JSON), for distillation without Python code:

    {"layers": [["conv2d", 4, 3, {"padding": 1}], ["relu"], ["maxpool2d", 2], ["flatten"],
                ["linear", 32], ["relu"], ["linear", 10]]}

Input sizes are inferred from an example batch (lazy layers), so a spec names only output sizes.
An unknown layer type or a malformed entry is an error naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

LAYERS = {
    "conv2d": lambda out, k, kw=None: nn.LazyConv2d(int(out), int(k), **(kw or {})),
    "linear": lambda out, kw=None: nn.LazyLinear(int(out), **(kw or {})),
    "relu": lambda: nn.ReLU(), "gelu": lambda: nn.GELU(), "tanh": lambda: nn.Tanh(),
    "maxpool2d": lambda k: nn.MaxPool2d(int(k)), "avgpool2d": lambda k: nn.AvgPool2d(int(k)),
    "flatten": lambda: nn.Flatten(), "dropout": lambda p: nn.Dropout(float(p)),
    "batchnorm2d": lambda: nn.LazyBatchNorm2d(),
}


def build_student(spec: dict | str | Path, example: torch.Tensor) -> nn.Sequential:
    if isinstance(spec, (str, Path)):
        try:
            spec = json.loads(Path(spec).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"student spec {spec}: {e}") from None
    layers = spec.get("layers") if isinstance(spec, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError("student spec: needs a non-empty 'layers' list")
    mods = []
    for i, entry in enumerate(layers):
        if not isinstance(entry, list) or not entry or entry[0] not in LAYERS:
            name = entry[0] if isinstance(entry, list) and entry else entry
            raise ValueError(f"student spec: layer {i} '{name}' is not one of {', '.join(LAYERS)}")
        try:
            mods.append(LAYERS[entry[0]](*entry[1:]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"student spec: layer {i} {entry}: {e}") from None
    model = nn.Sequential(*mods)
    with torch.no_grad():
        model(example)  # materialise the lazy layers
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
