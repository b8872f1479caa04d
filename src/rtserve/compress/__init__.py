"""Offline model compression (``rtserve compress``): quantize a model into a new file or a new
version folder of a repository model, measure it against its source, and write the report.

``CompressError`` is the one error every compressor raises for bad input, before any work starts.
"""
from __future__ import annotations


class CompressError(ValueError):
    """Bad input to a compressor (unknown method, missing file, mismatched calibration data...):
    raised before any output is written; the message names the offending item."""
