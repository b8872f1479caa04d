"""Prompt-lookup proposals: find the latest earlier occurrence of the sequence's last n tokens
(n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) and propose the tokens that followed it.

Each sequence keeps an index n-gram -> end of its latest occurrence, extended with the tokens added
since the last lookup, so a lookup costs a few dict probes whatever the context length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..sequence import Sequence


@dataclass
class _Index:
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> end (exclusive) of its latest occurrence
    upto: int = 0  # n-grams ending at positions <= upto are indexed


class NgramProposer:
    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self._index: dict[int, _Index] = {}

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to ``k`` tokens (fewer, or none, when the context has no match or too little after it)."""
        toks = seq.token_ids
        idx = self._index.get(seq.seq_id)
        if idx is None:
            idx = self._index[seq.seq_id] = _Index()
        last = len(toks) - 1  # n-grams with at least one token after them: ends <= last
        ends = idx.ends
        for end in range(max(idx.upto + 1, self.n_min), last + 1):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                ends[tuple(toks[end - n:end])] = end
        idx.upto = max(idx.upto, last)
        for n in range(min(self.n_max, len(toks)), self.n_min - 1, -1):
            end = ends.get(tuple(toks[-n:]))
            if end is not None:
                return toks[end:end + k]
        return []

    def forget(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)

    def prune(self, live: set[int]) -> None:
        for i in [i for i in self._index if i not in live]:
            del self._index[i]
