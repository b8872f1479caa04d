"""Structured outputs: constrained decoding to a JSON schema, a regex, a choice or a grammar."""
from .spec import STRUCTURED_KINDS, StructuredSpec

__all__ = ["STRUCTURED_KINDS", "StructuredSpec"]
