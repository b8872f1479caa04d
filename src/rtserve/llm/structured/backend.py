"""The grammar library behind structured outputs: llguidance (no Python dependencies; its mask
computation is native code that releases the GIL). Everything library-specific is here: the
tokenizer it needs, a ``StructuredSpec`` turned into its grammar, and ``GrammarMatcher``, the
per-sequence state.

JSON is compiled without free whitespace (compact ``,`` and ``:`` separators, no spaces or newlines
between tokens): whitespace the model could emit forever would void the guarantee that a bounded
schema ends. For the same reason an object schema that lists ``properties`` and does not say
``additionalProperties`` takes only those properties (``closed_objects``: OpenAI's strict mode
requires it, xgrammar's strict mode assumes it); ``additionalProperties: true`` keeps it open.
"""
from __future__ import annotations

import json

import llguidance as llg
import torch

from .spec import StructuredSpec

#: llguidance JSON compile options: no whitespace anywhere outside strings; unknown keywords are
#: errors (``lenient`` off), never silently ignored
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}
_QUIET = 0  # llguidance log level: errors come back as values, not on stderr


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled (bad schema, regex or grammar), or a model that cannot
    take one. ``param`` names the request field; ``str()`` is ``"<param>: <reason>"``."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param, self.reason = param, reason


class GrammarError(RuntimeError):
    """A matcher refused a token or reached an error state (this sequence fails, not the step)."""


class GrammarTokenizer:
    """llguidance's view of the model's tokenizer: ``tokenizer.json`` text, the width of the model's
    logits (``vocab_size``; ids past the tokenizer's are never allowed) and the EOS ids a finished
    grammar allows."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        base = llg.LLTokenizer(tokenizer_json, eos_token=sorted(eos_token_ids))
        n_vocab = max(vocab_size, base.vocab_size)
        self.ll = base if n_vocab == base.vocab_size else llg.LLTokenizer(
            tokenizer_json, n_vocab=n_vocab, eos_token=sorted(eos_token_ids))
        self.num_mask_words = (self.ll.vocab_size + 31) // 32  # int32 words of one row's bitmask


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed_objects(schema):
    """A copy of ``schema`` where every object schema that lists ``properties`` without saying
    ``additionalProperties`` gets ``additionalProperties: false`` (a random key could otherwise run on
    forever). Objects without ``properties`` (free-form maps) stay open."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: closed_objects(sub) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS or k in _SUBSCHEMAS:
            out[k] = closed_objects(v)
        else:
            out[k] = v
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_text(spec: StructuredSpec) -> str:
    """The llguidance grammar of ``spec``; StructuredOutputError when its text cannot be read."""
    try:
        if spec.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=JSON_OPTIONS)
        if spec.kind == "json_schema":
            schema = json.dumps(closed_objects(json.loads(spec.value)))
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            options = json.loads(spec.value)
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
        return llg.grammar_from("grammar", spec.value)  # GBNF / EBNF, or Lark
    except ValueError as e:
        raise StructuredOutputError(spec.param, f"invalid {spec.kind.replace('_', ' ')}: {e}") from None


def compile_matcher(tokenizer: GrammarTokenizer, spec: StructuredSpec) -> llg.LLMatcher:
    """A matcher at the grammar's start (a template: copy it per sequence). Compiling happens here
    (llguidance drops the GIL meanwhile). StructuredOutputError names what is wrong."""
    grammar = grammar_text(spec)
    matcher = llg.LLMatcher(tokenizer.ll, grammar, log_level=_QUIET)
    _check(matcher, spec)
    # some grammars fail only when the first mask is computed (a $ref cycle with no way out): try it
    # on a copy now, so that is a 400 here and not a failed sequence in the engine
    probe = matcher.deep_copy()
    first = torch.zeros((tokenizer.ll.vocab_size + 31) // 32, dtype=torch.int32)
    probe.unsafe_compute_mask_ptr(first.data_ptr(), first.numel() * 4)
    _check(probe, spec, " (no output can match it: a recursion with no way out?)")
    if not bool(first.any()):
        raise StructuredOutputError(spec.param, f"the {spec.kind.replace('_', ' ')} allows no output at all")
    return matcher


def _check(matcher: llg.LLMatcher, spec: StructuredSpec, hint: str = "") -> None:
    if matcher.is_error():
        reason = matcher.get_error().strip().splitlines()[0] if matcher.get_error().strip() else "rejected"
        raise StructuredOutputError(spec.param, f"invalid {spec.kind.replace('_', ' ')}: {reason}{hint}")


class GrammarMatcher:
    """One sequence's place in its grammar, with the bitmask of the tokens allowed next (bit ``t``
    of word ``t // 32`` set = token ``t`` allowed). ``fill`` may run on another thread than the
    engine's, never at the same time as ``advance`` (the engine waits for it)."""

    def __init__(self, matcher: llg.LLMatcher, num_mask_words: int) -> None:
        self._m = matcher
        self.mask = torch.zeros(num_mask_words, dtype=torch.int32)  # (W,) for the next token
        self.num_consumed = 0
        self._mask_at = -1  # num_consumed when ``mask`` was computed

    def fill(self) -> None:
        """Compute the next token's mask unless it is already there (releases the GIL)."""
        if self._mask_at != self.num_consumed:
            self._m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
            self._mask_at = self.num_consumed

    def next_mask(self) -> torch.Tensor:
        """(W,) int32 bitmask of the tokens allowed next. GrammarError in an error state."""
        self.fill()
        if self._m.is_error():
            raise GrammarError(self._error())
        return self.mask

    def advance(self, token_id: int) -> None:
        """Consume the sampled token. GrammarError if the grammar does not allow it."""
        if not self._m.consume_token(token_id):
            raise GrammarError(f"the grammar does not allow token {token_id}: {self._error()}")
        self.num_consumed += 1

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS can follow: the answer is complete."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    def _error(self) -> str:
        text = self._m.get_error().strip()
        return text.splitlines()[0] if text else "the matcher is in an error state"
