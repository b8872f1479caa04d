"""Hugging Face safetensors checkpoints -> our modules: built on the meta device, tensors loaded
memory-mapped and assigned name by name with shape checks. No pickle is ever loaded."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype, device: torch.device,
                 tied: tuple[str, str] | None = None, rename: Callable[[str], str | None] | None = None,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Fill ``model`` (on the meta device) from the checkpoint at ``path``.

    ``tied`` = (target, source): a parameter that may be absent from the checkpoint and then
    shares the source's tensor (tied embeddings). ``rename`` maps a checkpoint name to the model's
    (None: not a weight, skip it). ``extra``: tensors provided by the caller (quantized layers'
    stand-ins). Raises ValueError naming a missing, unexpected
    or mis-shaped tensor.
    """
    expected = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as st:
            for stored in st.keys():
                name = rename(stored) if rename is not None else stored
                if name is None:
                    continue
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"{f.name}: unexpected tensor '{name}' for {type(model).__name__}")
                t = st.get_tensor(stored)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{f.name}: tensor '{name}' has shape {list(t.shape)}, "
                                     f"the model needs {list(expected[name].shape)}")
                loaded[name] = t.to(device=device, dtype=dtype)
    for name, t in (extra or {}).items():
        if name not in expected or tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: quantized tensor '{name}' does not fit {type(model).__name__}")
        loaded[name] = t
    if tied is not None and tied[0] not in loaded and tied[1] in loaded:
        loaded[tied[0]] = loaded[tied[1]]
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor '{missing[0]}'" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(loaded, strict=True, assign=True)
