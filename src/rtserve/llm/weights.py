"""Hugging Face safetensors checkpoints -> our modules: built on the meta device, tensors loaded
memory-mapped and assigned name by name with shape checks. No pickle is ever loaded.

Every tensor is checked for NaN and infinity as it is read (``check_finite``: all of a small
tensor, an evenly spaced sample of a large one), so a broken checkpoint is refused at load
instead of answering garbage."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..paths import confined

INDEX = "model.safetensors.index.json"
FULL_CHECK_ELEMENTS = 1 << 20  # tensors below this many elements are checked whole
SAMPLE_ELEMENTS = 4096  # larger ones: this many elements, evenly spaced


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of checkpoint folder ``path``: the shards the index names (which must
    stay in ``path``), else ``model.safetensors``. Raises ValueError when there are none."""
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return [confined(path, n, f"{index} weight_map", allow_symlinks=True) for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{path}: no model.safetensors or {INDEX}")


@contextmanager
def open_checkpoint(f: Path) -> Iterator:
    """``safe_open`` whose failures (a truncated or corrupt file) are a ValueError naming ``f``."""
    try:
        with safe_open(str(f), framework="pt") as st:
            yield st
    except SafetensorError as e:
        raise ValueError(f"{f}: {type(e).__name__}: {e}") from None


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raise ValueError naming ``where`` if the floating-point tensor ``t`` holds NaN or infinity:
    checked whole below ``FULL_CHECK_ELEMENTS`` elements, else on ``SAMPLE_ELEMENTS`` evenly spaced
    ones (cheap on a memory-mapped checkpoint; a sample cannot prove a large tensor clean)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    flat = t.reshape(-1)
    if flat.numel() >= FULL_CHECK_ELEMENTS:
        n = flat.numel()
        flat = flat[torch.arange(SAMPLE_ELEMENTS, device=flat.device) * (n - 1) // (SAMPLE_ELEMENTS - 1)]
    if not bool(torch.isfinite(flat).all()):
        bad = "NaN" if bool(torch.isnan(flat).any()) else "infinite"
        raise ValueError(f"{where} has {bad} values: the checkpoint is broken")


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
        with open_checkpoint(f) as st:
            for stored in st.keys():
                name = rename(stored) if rename is not None else stored
                if name is None:
                    continue
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"{f.name}: unexpected tensor '{name}' for {type(model).__name__}")
                t = st.get_tensor(stored)
                check_finite(t, f"{f.name}: tensor '{stored}'")
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
