"""Prefix-cache hashes are computed incrementally (only blocks that filled since the last step):
they must equal the chained hashes of the whole token list, whatever the step sizes."""
from rtserve.llm.block_manager import BlockManager, block_hash
from rtserve.llm.sequence import Sequence


def chain(tokens, bs):
    out, parent = [], None
    for i in range(0, len(tokens) - bs + 1, bs):
        parent = block_hash(parent, tuple(tokens[i:i + bs]))
        out.append(parent)
    return out


def test_incremental_hashes_equal_full_chain_and_are_found_again():
    bm = BlockManager(num_blocks=32, block_size=4)
    seq = Sequence(list(range(10)), max_tokens=30)
    for step in (7, 3, 1, 1, 1, 5, 1, 1, 1, 1):  # prefill chunks, then decode steps
        assert bm.allocate(seq, step)
        seq.num_computed_tokens += step
        while seq.num_tokens <= seq.num_computed_tokens:
            seq.append_token(100 + seq.num_tokens)
        bm.cache_full_blocks(seq)
        full = seq.num_computed_tokens // 4
        assert [bm.blocks[b].hash for b in seq.block_table[:full]] == chain(seq.token_ids, 4)[:full]
        assert all(bm.blocks[b].hash is None for b in seq.block_table[full:])
    bm.check_integrity()
    other = Sequence(list(seq.token_ids[:13]) + [7, 7], max_tokens=1)
    assert bm.take_cached_prefix(other) == 12
    assert other.block_table == seq.block_table[:3]
    bm.free(seq)
    bm.free(other)
    bm.check_integrity()
