"""Compression methods (``rtserve compress --quantize|--prune|--distill``): the contract in
``base.py``, one module per method family. A new method is one module with a ``@register_method``
class and one import line below (its position: the order in ``--help``)."""
from __future__ import annotations

from .base import (COMPRESSION_METHODS, CompressionMethod, CompressionOutcome, file_outcome, flags, method_names,
                   register_method, select_method, source_kind)
from . import onnx_int8, llm_weight, spec, lm  # noqa: E402,F401  (registration)

__all__ = ["COMPRESSION_METHODS", "CompressionMethod", "CompressionOutcome", "file_outcome", "flags",
           "method_names", "register_method", "select_method", "source_kind"]
