"""The torch-free parts of speculative decoding, with fake sequences: prompt lookup, block trimming,
and the scheduler taking verified tokens (counted as computed; only real tokens reach the prefix cache)."""
from __future__ import annotations

from rtserve.llm.block_manager import BlockManager
from rtserve.llm.scheduler import Scheduler, SchedulerConfig
from rtserve.llm.sequence import FinishReason, Sequence
from rtserve.llm.speculative.ngram import NgramProposer


def test_prompt_lookup_prefers_the_longest_then_the_latest_match():
    p = NgramProposer(1, 3)
    seq = Sequence([1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3], 10)
    # [1, 2, 3] occurred at 0..2 (followed by 9, 9, 5); [2, 3] later at 6..7 is shorter: the 3-gram wins
    assert p.propose(seq, 3) == [9, 9, 5]
    seq.token_ids += [4, 2, 3]  # now only [2, 3] / [3] match; the latest [2, 3] is at 11..12 -> 4, 2, 3
    assert p.propose(seq, 2) == [4, 2]
    other = Sequence([5, 6, 7], 4)
    assert p.propose(other, 2) == []  # no earlier occurrence
    p.forget(seq.seq_id)
    p.prune(set())
    assert not p._index


def test_trim_returns_unused_tail_blocks_to_the_front():
    bm = BlockManager(8, 4)
    seq = Sequence(list(range(6)), 10)
    assert bm.allocate(seq, 6 + 5)  # 11 tokens: 3 blocks
    seq.num_computed_tokens = 6
    bm.cache_full_blocks(seq)
    bm.trim(seq, 7)  # 7 tokens need 2 blocks
    assert len(seq.block_table) == 2 and bm.num_free == 6
    fresh = Sequence([0], 1)
    assert bm.allocate(fresh, 1) and fresh.block_table == [2]  # the trimmed block first, no cached block evicted
    bm.free(seq)
    bm.free(fresh)
    bm.check_integrity()


def test_update_takes_verified_tokens_and_stops_inside_them():
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), bm)
    a = Sequence([1, 2, 3], 10, stop_token_ids=frozenset({99}))
    b = Sequence([4, 5, 6], 10, stop_token_ids=frozenset({99}))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.update(out, {a.seq_id: 7, b.seq_id: 8})
    out = sched.schedule()  # both decode one token; pretend each verified proposals
    sched.update(out, {a.seq_id: [10, 11, 12, 13], b.seq_id: [20, 99, 21]})
    assert a.token_ids == [1, 2, 3, 7, 10, 11, 12, 13] and a.num_computed_tokens == 7
    assert b.token_ids == [4, 5, 6, 8, 20, 99] and b.finish_reason is FinishReason.STOP
    # the prefix cache holds the computed full blocks only: a's second block has 3 computed tokens
    assert {blk.token_ids for blk in bm.blocks if blk.hash is not None} == {(1, 2, 3, 7), (4, 5, 6, 8)}
    sched.abort(a)
    bm.check_integrity()
