"""Offline model compression (``rtserve compress``): quantization, pruning and distillation, each
writing a new file or a new version folder of a repository model, measured against its source in
a report. Each method is a ``CompressionMethod`` in ``methods/`` (one module per family, registered by
name); ``cli.py`` dispatches through that registry. Conversion between formats lives in ``export/``
(its targets registered the same way, ``export/targets/``); spec models in ``spec/``.

``CompressError`` is the one error every compressor raises for bad input, before any work starts.
"""
from __future__ import annotations

from ..errors import CompressError

__all__ = ["CompressError"]
