"""Decoder architectures the engine loads, by ``DecoderConfig.family`` (read from ``config.json``).

An architecture is an ``nn.Module`` built on the meta device as ``cls(config, device=...)``, filled
by ``weights.load_weights`` (``checkpoint_name`` maps Hugging Face names, ``tied_weights`` names the
tied head), prepared by ``prepare_for_inference(quantized=...)``, and called per step as
``model(ids, positions, kv_caches, attention_metadata, logits_index) -> logits``. Adding one is a
module here, one ``register_architecture`` line, and its ``config.json`` reading in ``llm/config.py``.
"""
from __future__ import annotations

ARCHITECTURES: dict[str, type] = {}


def register_architecture(*families: str):
    """Class decorator: serve checkpoints of these ``DecoderConfig.family`` values with ``cls``."""
    def deco(cls):
        for f in families:
            ARCHITECTURES[f] = cls
        return cls
    return deco


def model_class(config) -> type:
    """The module class for a ``DecoderConfig``; ValueError naming the family otherwise."""
    from . import gpt2, llama  # noqa: F401 - they register themselves

    try:
        return ARCHITECTURES[config.family]
    except KeyError:
        raise ValueError(f"no decoder architecture is registered for family '{config.family}'; "
                         f"registered: {', '.join(sorted(ARCHITECTURES))}") from None
