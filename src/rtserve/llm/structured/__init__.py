"""Structured outputs: constrained decoding to a JSON schema, a regex, a choice or a grammar.

``spec`` (what a request asks) -> ``compiler`` (compiled once per distinct spec, LRU) -> ``backend``
(the llguidance adapter: a matcher per sequence) -> ``masks`` (the engine's step: bitmasks before
sampling, matchers advanced after; optionally the next masks computed during the next forward pass).
The bitmasks themselves are applied in ``sampler.apply_bitmasks``."""
from .backend import GrammarError, GrammarMatcher, StructuredOutputError
from .compiler import GrammarCompiler
from .masks import GrammarStage
from .spec import STRUCTURED_KINDS, StructuredSpec

__all__ = ["STRUCTURED_KINDS", "GrammarCompiler", "GrammarError", "GrammarMatcher", "GrammarStage",
           "StructuredOutputError", "StructuredSpec"]
