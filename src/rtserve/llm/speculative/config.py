"""model.yaml's ``engine.speculative`` mapping: which proposer, how many tokens a step proposes.

No torch here (``engine_config`` imports it, and the server validates a model.yaml without the engine).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("ngram", "draft")
MAX_NUM_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method``: "ngram" (prompt lookup: the tokens that followed the latest earlier occurrence of
    the sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens) or "draft" (a smaller
    checkpoint with the same vocabulary, at ``draft``: a folder path, relative paths resolved from the
    target checkpoint's folder; served, it must lie inside the model's folder). ``num_tokens``: the
    most tokens proposed for a sequence per step (K); each verification computes K + 1 rows."""

    method: str
    num_tokens: int = 4
    draft: str | None = None
    prompt_lookup_min: int | None = None  # ngram only; default 2 (or max when max is below 2)
    prompt_lookup_max: int | None = None  # ngram only; default 4 (or min when min is above 4)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"engine.speculative.method: '{self.method}' is not one of {', '.join(METHODS)}")
        _int("num_tokens", self.num_tokens, 1, MAX_NUM_TOKENS)
        if self.method == "draft":
            if not isinstance(self.draft, str) or not self.draft:
                raise ValueError("engine.speculative.draft: method 'draft' needs the draft checkpoint's folder "
                                 f"(a path string), got {self.draft!r}")
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"engine.speculative.{name}: only for method 'ngram'")
            return
        if self.draft is not None:
            raise ValueError("engine.speculative.draft: only for method 'draft'")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if v is not None:
                _int(name, v, 1, 64)
        lo = lo if lo is not None else min(2, hi if hi is not None else 2)
        hi = hi if hi is not None else max(4, lo)
        if lo > hi:
            raise ValueError(f"engine.speculative.prompt_lookup_min {lo} is above prompt_lookup_max {hi}")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @classmethod
    def from_value(cls, raw) -> "SpeculativeConfig | None":
        """The config of a model.yaml ``speculative:`` value (a mapping, an instance or None).
        Raises ValueError naming an unknown key or a bad value."""
        if raw is None or isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"engine.speculative: expected a mapping with method, num_tokens, ..., got {raw!r}")
        allowed = tuple(f.name for f in fields(cls))
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f"engine.speculative: unknown key '{unknown[0]}'; allowed: {', '.join(allowed)}")
        if "method" not in raw:
            raise ValueError(f"engine.speculative.method: missing; one of {', '.join(METHODS)}")
        return cls(**raw)


def _int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"engine.speculative.{name}: must be an integer in [{lo}, {hi}], got {value!r}")
