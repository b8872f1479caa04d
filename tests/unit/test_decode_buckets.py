"""decode_buckets: decoding sequences grouped by context length so a long one does not pad the rest."""
from rtserve.llm.model_runner import decode_buckets


def members(contexts):
    return [(i, i, 1, c) for i, c in enumerate(contexts)]


def test_similar_lengths_stay_one_group():
    assert len(decode_buckets(members([100, 90, 120, 80] * 16), 16)) == 1


def test_one_long_sequence_gets_its_own_group():
    groups = decode_buckets(members([40] * 63 + [2000]), 16)
    assert [len(g) for g in groups] == [1, 63]
    assert groups[0][0][3] == 2000


def test_small_savings_do_not_split():  # 2 short sequences padded by a few blocks: one group is cheaper
    assert len(decode_buckets(members([300, 100, 100]), 16)) == 1


def test_every_member_once_and_at_most_four_groups():
    ctx = [2 ** k for k in range(4, 14)] * 3
    groups = decode_buckets(members(ctx), 16)
    assert len(groups) <= 4
    assert sorted(m[0] for g in groups for m in g) == list(range(len(ctx)))
    widths = [max(m[3] for m in g) for g in groups]
    assert widths == sorted(widths, reverse=True)


def test_one_group_keeps_the_step_order():  # a single group's output rows are the step's, in order
    assert [m[0] for m in decode_buckets(members([10, 80, 30, 60]), 16)[0]] == [0, 1, 2, 3]
