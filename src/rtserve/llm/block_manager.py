"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A *full* block is identified by a chained content hash: hash(parent block's hash, its token ids),
so equal hashes mean equal prefixes. Sequences that share a prefix share its blocks (ref counts).
A block whose ref count drops to 0 keeps its hash and goes to the end of the free queue, so it can
be revived by a later request with the same prefix until it is reused: the least recently freed
block is evicted first (LRU).

A full block computed by a scored sequence (prompt logprobs) may also carry ``scores``: an opaque
payload (``prompt_logprobs.BlockScores``: its tokens' logprobs and the log-probabilities at its last
position), so a later scored prompt can take the block from the cache and still have every logprob.
At most ``max_scored_blocks`` blocks keep one (the oldest payload is dropped first); eviction drops it.

Invariant (``check_integrity``): every block is either free (ref 0, in the free queue) or used
(ref > 0), so ``num_free + num_used == num_blocks``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept for full blocks, to reject hash collisions
    scores: Any = None  # prompt_logprobs.BlockScores, when a scored sequence computed it


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    """Allocates KV blocks to sequences.

    Args:
        num_blocks: blocks in the KV cache (from config: a count or a memory fraction).
        block_size: tokens per block.
        enable_prefix_caching: share full blocks between sequences by content hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_scored_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self._by_hash: dict[int, int] = {}
        self.max_scored_blocks = max_scored_blocks
        self._scored: OrderedDict[int, None] = OrderedDict()  # blocks with a payload, oldest first
        self.num_prefix_queries = 0  # full prompt blocks looked up
        self.num_prefix_hits = 0     # of which found in the cache

    # -- counters ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_integrity(self) -> None:
        used = sum(1 for b in self.blocks if b.ref_count > 0)
        free = sum(1 for b in self.blocks if b.ref_count == 0)
        assert free == len(self._free) and used + free == self.num_blocks, (used, free, len(self._free))
        assert all(self.blocks[i].ref_count == 0 for i in self._free)
        for h, i in self._by_hash.items():
            assert self.blocks[i].hash == h

    # -- prefix cache ------------------------------------------------------------------------------
    def _full_block_hashes(self, token_ids: list[int], limit: int) -> list[tuple[int, tuple[int, ...]]]:
        out, parent = [], None
        for start in range(0, limit - self.block_size + 1, self.block_size):
            toks = tuple(token_ids[start:start + self.block_size])
            parent = block_hash(parent, toks)
            out.append((parent, toks))
        return out

    def prompt_block_hashes(self, seq: Sequence) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of each full block of ``seq``'s tokens, leaving at least one token after them."""
        return self._full_block_hashes(seq.token_ids, seq.num_tokens - 1)

    def take_cached_prefix(self, seq: Sequence, accept: Callable[[Any], bool] | None = None,
                           hashes: list | None = None) -> int:
        """For a sequence with no blocks yet: attach the longest cached run of full blocks of its
        tokens (always leaving at least one token to compute, so the step yields logits); with
        ``accept``, only blocks whose ``scores`` it accepts (a scored prompt). ``hashes``:
        ``prompt_block_hashes(seq)`` if the caller has them.
        Returns the number of tokens found, and sets ``num_computed_tokens``/``num_cached_tokens``.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        if hashes is None:
            hashes = self.prompt_block_hashes(seq)
        self.num_prefix_queries += len(hashes)
        for h, toks in hashes:
            i = self._by_hash.get(h)
            if i is None or self.blocks[i].token_ids != toks or accept is not None and not accept(self.blocks[i].scores):
                break
            self._ref(i)
            seq.block_table.append(i)
        found = len(seq.block_table) * self.block_size
        self.num_prefix_hits += len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = found
        return found

    def uncached_block_hashes(self, seq: Sequence, hashes: list | None = None) -> list[int]:
        """The hashes of the full prompt blocks after ``seq``'s cached ones (what it will compute);
        ``hashes``: ``prompt_block_hashes(seq)`` if the caller has them."""
        if hashes is None:
            hashes = self.prompt_block_hashes(seq)
        return [h for h, _ in hashes[len(seq.block_table):]]

    def _ref(self, i: int) -> None:
        b = self.blocks[i]
        if b.ref_count == 0:
            del self._free[i]
        b.ref_count += 1

    # -- allocation ------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` enough blocks to hold ``num_new_tokens`` more computed tokens.
        Returns False (allocating nothing) if there are not enough free blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self._free):
            return False
        for _ in range(need):
            i, _ = self._free.popitem(last=False)  # least recently freed first
            b = self.blocks[i]
            if b.hash is not None:  # evict its cached content
                if self._by_hash.get(b.hash) == i:
                    del self._by_hash[b.hash]
                b.hash, b.token_ids = None, ()
            self._drop_scores(i)
            b.ref_count = 1
            seq.block_table.append(i)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's computed full blocks in the prefix cache (after a step), with
        the scores a scored sequence prepared for them (``seq.block_scores``)."""
        if not self.enable_prefix_caching:
            seq.block_scores.clear()
            return
        # only the blocks that filled since the last call: a block with a hash holds this sequence's
        # chain up to it (set here, or shared through take_cached_prefix), so hashing restarts there
        # (rehashing every full block every step cost O(context) per sequence and step)
        bs, table = self.block_size, seq.block_table
        full = seq.num_computed_tokens // bs
        n = full
        while n and self.blocks[table[n - 1]].hash is None:
            n -= 1
        parent = self.blocks[table[n - 1]].hash if n else None
        for i in range(n, full):
            toks = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = block_hash(parent, toks)
            b = self.blocks[table[i]]
            b.hash, b.token_ids = parent, toks
            known = self._by_hash.get(parent)
            scores = seq.block_scores.pop(i, None)
            if scores is not None and self.max_scored_blocks:
                b.scores = scores
                self._scored[b.block_id] = None
                if len(self._scored) > self.max_scored_blocks:
                    self._drop_scores(next(iter(self._scored)))
                if known is not None and self.blocks[known].scores is None:
                    known = None  # the scored copy serves both kinds of prompt
            if known is None:
                self._by_hash[parent] = b.block_id
        seq.block_scores.clear()

    def _drop_scores(self, i: int) -> None:
        if self.blocks[i].scores is not None:
            self.blocks[i].scores = None
            del self._scored[i]

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` tokens' (speculative decoding, after
        rejected proposals). They hold no computed token, so they are unhashed and unshared; they go
        to the front of the free queue, so reusing them evicts no cached prefix."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            i = seq.block_table.pop()
            b = self.blocks[i]
            assert b.ref_count == 1 and b.hash is None, (i, b.ref_count, b.hash)
            b.ref_count = 0
            self._free[i] = None
            self._free.move_to_end(i, last=False)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; blocks reaching ref 0 stay cached until evicted.
        The tail is freed first so a prompt's leading blocks are evicted last."""
        for i in reversed(seq.block_table):
            b = self.blocks[i]
            b.ref_count -= 1
            if b.ref_count == 0:
                self._free[i] = None
        seq.block_table = []
