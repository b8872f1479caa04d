"""Conversion targets (``rtserve convert --to NAME``): the contract in ``base.py``, one module per
format. A new format is one module with a ``@register_target`` class and one import line below."""
from __future__ import annotations

from .base import (TARGETS, ConversionError, ConversionOptions, ConversionTarget, LoadedSource, register_target,
                   target_for, vias)
from . import onnx, pt2, tflite  # noqa: E402,F401  (registration, in --to order)

__all__ = ["TARGETS", "ConversionError", "ConversionOptions", "ConversionTarget", "LoadedSource",
           "register_target", "target_for", "vias"]
