"""Compiled grammars, cached: one compile per distinct ``StructuredSpec`` (LRU-bounded), then a
cheap copy per sequence. Thread-safe: the server compiles on a worker thread before a request is
queued, and the engine only copies what is cached."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from .backend import GrammarMatcher, GrammarTokenizer, StructuredOutputError, compile_matcher
from .spec import StructuredSpec

NO_TOKENIZER = "structured outputs need the model's tokenizer (tokenizer.json)"


class GrammarCompiler:
    """``compile(spec)`` checks and caches a constraint; ``matcher(spec)`` gives a sequence its own
    matcher. ``tokenizer_path`` None (a model without ``tokenizer.json``): every spec is refused."""

    def __init__(self, tokenizer_path: Path | None, vocab_size: int, eos_token_ids: frozenset[int],
                 capacity: int = 256) -> None:
        self.tokenizer_path, self.vocab_size, self.eos_token_ids = tokenizer_path, vocab_size, eos_token_ids
        self.capacity = capacity
        self._tokenizer: GrammarTokenizer | None = None
        self._cache: OrderedDict[StructuredSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # compiles done (cache misses), for tests and metrics

    @property
    def tokenizer(self) -> GrammarTokenizer:
        """Built on first use (about 0.1 s for a 32k vocabulary)."""
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise StructuredOutputError("response_format", NO_TOKENIZER)
            self._tokenizer = GrammarTokenizer(self.tokenizer_path.read_text(), self.vocab_size,
                                               sorted(self.eos_token_ids))
        return self._tokenizer

    def compile(self, spec: StructuredSpec):
        """The compiled template for ``spec`` (cached). StructuredOutputError when it is invalid
        (invalid ones are not cached: they are cheap to refuse again)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            if self.tokenizer_path is None:
                raise StructuredOutputError(spec.param, NO_TOKENIZER)
            tokenizer = self.tokenizer
        compiled = compile_matcher(tokenizer, spec)  # outside the lock: llguidance drops the GIL
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredSpec) -> GrammarMatcher:
        """A new matcher at the start of ``spec``'s grammar."""
        template = self.compile(spec)
        with self._lock:
            copy = template.deep_copy()
        return GrammarMatcher(copy, self.tokenizer.num_mask_words)
