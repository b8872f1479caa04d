"""A trainable PyTorch model kept as data, not as a pickle: ``model.spec.json`` (the layer list of
``spec.py`` plus the input shape and tensor names) and ``model.safetensors`` (its weights). Pruning
and distillation read and write this form; each result is also exported to ONNX to be served and
timed. ``spec_from_model`` writes the spec of a (pruned) ``nn.Sequential`` back out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CompressError
from .layers import build_student

SPEC, WEIGHTS = "model.spec.json", "model.safetensors"


@dataclass(frozen=True)
class SpecModel:
    model: nn.Sequential
    input_shape: tuple[int, ...]   # one sample, without the batch axis
    input_name: str
    output_name: str

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape)


def spec_from_model(model: nn.Sequential) -> list:
    layers = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            kw = {"stride": m.stride[0], "padding": m.padding[0]} if isinstance(m.padding, tuple) else {"stride": m.stride[0]}
            layers.append(["conv2d", m.out_channels, m.kernel_size[0], kw])
        elif isinstance(m, nn.Linear):
            layers.append(["linear", m.out_features])
        elif isinstance(m, nn.MaxPool2d):
            layers.append(["maxpool2d", m.kernel_size])
        elif isinstance(m, nn.AvgPool2d):
            layers.append(["avgpool2d", m.kernel_size])
        elif isinstance(m, nn.Dropout):
            layers.append(["dropout", m.p])
        elif isinstance(m, nn.BatchNorm2d):
            layers.append(["batchnorm2d"])
        elif type(m) in (nn.ReLU, nn.GELU, nn.Tanh, nn.Flatten):
            layers.append([{nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Flatten: "flatten"}[type(m)]])
        else:
            raise CompressError(f"layer {i} ({type(m).__name__}) cannot be written as a spec")
    return layers


def save_spec_model(sm: SpecModel, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC).write_text(json.dumps({"layers": spec_from_model(sm.model), "input_shape": list(sm.input_shape),
                                           "input_name": sm.input_name, "output_name": sm.output_name}, indent=1))
    save_file({k: v.contiguous() for k, v in sm.model.state_dict().items()}, str(folder / WEIGHTS))


def load_spec_model(folder: Path) -> SpecModel:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
        raise CompressError(f"{folder}: a PyTorch source needs {SPEC} and {WEIGHTS}")
    meta = json.loads((folder / SPEC).read_text())
    shape = tuple(int(d) for d in meta.get("input_shape") or ())
    if not shape:
        raise CompressError(f"{folder / SPEC}: 'input_shape' (one sample, no batch axis) is missing")
    try:
        model = build_student(meta, torch.zeros(2, *shape))
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (ValueError, RuntimeError) as e:
        raise CompressError(f"{folder}: {e}") from None
    return SpecModel(model.eval(), shape, meta.get("input_name", "input"), meta.get("output_name", "output"))
