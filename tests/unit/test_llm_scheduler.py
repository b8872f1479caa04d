"""Scheduler and block manager with fake model outputs: milliseconds, no torch."""
from __future__ import annotations

import pytest

from rtserve.llm.block_manager import BlockManager
from rtserve.llm.scheduler import Overloaded, RequestTooLarge, Scheduler, SchedulerConfig
from rtserve.llm.sequence import FinishReason, Sequence


def fake_next(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + 7) % 1000 + 10


def run(sched: Scheduler, max_steps: int = 10_000, on_step=None) -> list:
    steps = []
    for _ in range(max_steps):
        if not sched.has_work:
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        steps.append([(s.seq.seq_id, s.num_tokens) for s in out.scheduled])
        sched.update(out, {seq.seq_id: fake_next(seq.token_ids) for seq in out.to_sample})
        sched.bm.check_integrity()
        if on_step:
            on_step(out)
    assert not sched.has_work, "did not finish"
    return steps


def make(num_blocks=64, block_size=4, caching=True, **cfg):
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, caching))


def seq(prompt, max_tokens=5, **kw):
    return Sequence(list(prompt), max_tokens, **kw)


def reference(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(fake_next(toks))
    return toks[len(prompt):]


def test_chunked_prefill_respects_the_token_budget():
    s = make(max_num_batched_tokens=16)
    a = seq(range(1, 41), max_tokens=3)
    s.add(a)
    steps = run(s)
    assert steps[:3] == [[(a.seq_id, 16)], [(a.seq_id, 16)], [(a.seq_id, 8)]]
    assert steps[3:] == [[(a.seq_id, 1)], [(a.seq_id, 1)]]
    assert a.generated_ids == reference(range(1, 41), 3) and a.finish_reason is FinishReason.LENGTH
    assert s.bm.num_used == 0


def test_decode_and_prefill_chunks_share_a_step():
    s = make(max_num_batched_tokens=10)
    a = seq([1, 2, 3], max_tokens=6)
    s.add(a)
    s.update(o := s.schedule(), {a.seq_id: fake_next(a.token_ids)})
    b = seq(range(50, 70), max_tokens=2)
    s.add(b)
    out = s.schedule()
    assert [(x.seq.seq_id, x.num_tokens) for x in out.scheduled] == [(a.seq_id, 1), (b.seq_id, 9)]
    s.update(out, {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    run(s)
    assert a.generated_ids == reference([1, 2, 3], 6) and b.generated_ids == reference(range(50, 70), 2)


def test_many_ragged_sequences_match_running_each_alone():
    prompts = [list(range(i, i + 3 + 5 * i)) for i in range(1, 12)]
    s = make(max_num_batched_tokens=32, max_num_seqs=4)
    seqs = [seq(p, max_tokens=4 + i) for i, p in enumerate(prompts)]
    for q in seqs:
        s.add(q)
    run(s)
    for i, (p, q) in enumerate(zip(prompts, seqs)):
        assert q.generated_ids == reference(p, 4 + i)


def test_preemption_recomputes_and_changes_nothing():
    # 10 blocks of 4 tokens cannot hold three 12-token prompts growing by 10 tokens each
    s = make(num_blocks=10, block_size=4, caching=False, max_num_batched_tokens=64)
    prompts = [list(range(k * 100, k * 100 + 12)) for k in range(3)]
    seqs = [seq(p, max_tokens=10) for p in prompts]
    for q in seqs:
        s.add(q)
    preempted = []
    run(s, on_step=lambda out: preempted.extend(out.preempted))
    assert preempted, "the cache was big enough: the test does not test preemption"
    assert preempted[0] is seqs[-1]  # the newest goes first
    for p, q in zip(prompts, seqs):
        assert q.generated_ids == reference(p, 10) and q.finish_reason is FinishReason.LENGTH
    assert s.bm.num_free == 10


def test_prefix_cache_shares_blocks_and_counts_hits():
    s = make(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    shared = list(range(1, 9))  # two full blocks
    a = seq(shared + [20, 21, 22], max_tokens=2)
    s.add(a)
    run(s)
    b = seq(shared + [30, 31], max_tokens=2)
    s.add(b)
    out = s.schedule()
    assert b.num_cached_tokens == 8 and out.scheduled[0].num_tokens == 2  # only the new tail runs
    assert s.bm.num_prefix_hits == 2
    shared_blocks = b.block_table[:2]
    s.update(out, {b.seq_id: fake_next(b.token_ids)})
    c = seq(shared + [40], max_tokens=1)
    s.add(c)
    s.schedule()
    assert c.block_table[:2] == shared_blocks and all(s.bm.blocks[i].ref_count == 2 for i in shared_blocks)
    run(s)
    assert b.generated_ids == reference(shared + [30, 31], 2) and c.generated_ids == reference(shared + [40], 1)
    s.bm.check_integrity()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make(block_size=4)
    p = list(range(1, 9))
    a = seq(p, max_tokens=1)
    s.add(a)
    run(s)
    b = seq(p, max_tokens=1)
    s.add(b)
    out = s.schedule()
    assert b.num_cached_tokens == 4 and out.scheduled[0].num_tokens == 4
    s.update(out, {b.seq_id: fake_next(b.token_ids)})
    assert b.generated_ids == a.generated_ids


def test_lru_eviction_of_freed_cached_blocks():
    bm = BlockManager(4, 2)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    a = seq([1, 2, 3, 4, 5], max_tokens=1)
    s.add(a)
    run(s)  # a's full blocks [1,2] and [3,4] are cached and free
    assert bm.num_free == 4 and len(bm._by_hash) >= 2
    b = seq([9, 8, 7, 6, 5, 4, 3], max_tokens=1)  # needs all 4 blocks: evicts every cached one
    s.add(b)
    run(s)
    c = seq([1, 2, 3, 4, 5], max_tokens=1)
    s.add(c)
    s.schedule()
    assert c.num_cached_tokens == 0  # a's prefix was evicted


def test_stop_tokens_and_max_model_len():
    s = make(max_model_len=16)
    stop_at = reference([5, 6, 7], 3)[2]
    a = seq([5, 6, 7], max_tokens=50, stop_token_ids=frozenset({stop_at}))
    b = seq([1] * 10, max_tokens=50)
    c = seq([5, 6, 7], max_tokens=50)  # ignore_eos: LLM.make_sequences leaves EOS out of the stop set
    for q in (a, b, c):
        s.add(q)
    run(s)
    assert a.finish_reason is FinishReason.STOP and a.num_generated == 3
    assert b.finish_reason is FinishReason.LENGTH and b.num_tokens == 16
    assert c.finish_reason is FinishReason.LENGTH and c.num_tokens == 16


def test_requests_that_can_never_fit_are_rejected_with_a_reason():
    s = make(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(RequestTooLarge, match="maximum context is 64"):
        s.add(seq(range(64)))
    with pytest.raises(RequestTooLarge, match="KV-cache blocks"):
        s.add(seq(range(20)))
    with pytest.raises(RequestTooLarge, match="empty"):
        s.add(seq([]))
    assert not s.has_work


def test_abort_frees_blocks_at_once():
    s = make(num_blocks=16, block_size=4)
    a, b = seq(range(1, 11), max_tokens=20), seq(range(1, 6), max_tokens=20)
    s.add(a)
    s.add(b)
    s.update(out := s.schedule(), {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    s.abort(a)
    assert a.finish_reason is FinishReason.ABORT and a.block_table == []
    s.abort(b)
    s.bm.check_integrity()
    assert s.bm.num_used == 0 and not s.has_work


def test_max_num_seqs_limits_running():
    s = make(max_num_seqs=2, max_num_batched_tokens=100)
    qs = [seq([i, i + 1], max_tokens=3) for i in range(5)]
    for q in qs:
        s.add(q)
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 3
    s.update(out, {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    run(s)
    assert all(q.num_generated == 3 for q in qs)


# -- priority and admission control

def start_order(sched: Scheduler) -> list[int]:
    """Run to the end; the seq_ids in the order they were first scheduled."""
    order: list[int] = []

    def on_step(out):
        for x in out.scheduled:
            if x.seq.seq_id not in order:
                order.append(x.seq.seq_id)
    run(sched, on_step=on_step)
    return order


def test_waiting_queue_runs_lower_priority_values_first_then_arrival():
    s = make(max_num_seqs=1, max_num_batched_tokens=100)
    first = seq([1, 2], max_tokens=3)  # runs first: nothing else is there
    s.add(first)
    s.update(out := s.schedule(), {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    qs = [seq([i, i + 1], max_tokens=2, priority=p) for i, p in enumerate([5, 0, 5, -3, 0])]
    for q in qs:
        s.add(q)
    assert [q.priority for q in s.waiting] == [-3, 0, 0, 5, 5]
    order = start_order(s)
    # lower value first (vLLM's convention), equal priorities in arrival order
    assert order == [first.seq_id] + [qs[i].seq_id for i in (3, 1, 4, 0, 2)]
    assert all(q.num_generated == 2 for q in qs)


def test_priority_never_preempts_a_running_sequence():
    s = make(max_num_seqs=1, max_num_batched_tokens=100)
    low = seq([1, 2], max_tokens=4, priority=10)
    s.add(low)
    s.update(out := s.schedule(), {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    urgent = seq([3, 4], max_tokens=1, priority=-10)
    s.add(urgent)
    out = s.schedule()
    assert [x.seq for x in out.scheduled] == [low] and s.waiting[0] is urgent
    s.update(out, {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    assert start_order(s) == [low.seq_id, urgent.seq_id]
    assert low.num_preemptions == 0 and low.num_generated == 4


def test_a_preempted_sequence_goes_back_by_its_priority():
    # 6 blocks of 4 tokens: two 8-token prompts growing by 8 each cannot both stay
    s = make(num_blocks=6, block_size=4, caching=False, max_num_batched_tokens=64, max_num_seqs=2)
    a, b = seq(range(10, 18), max_tokens=8, priority=1), seq(range(20, 28), max_tokens=8, priority=1)
    s.add(a)
    s.add(b)
    urgent_seen = []

    def on_step(out):
        if out.preempted and not urgent_seen:
            urgent = seq([1, 2], max_tokens=1, priority=0)
            s.add(urgent)
            urgent_seen.append(urgent)
            assert list(s.waiting) == [urgent, b]  # the preempted b waits behind a better priority
    run(s, on_step=on_step)
    assert urgent_seen and b.num_preemptions >= 1
    assert a.generated_ids == reference(range(10, 18), 8) and b.generated_ids == reference(range(20, 28), 8)


def test_admission_limits_the_sequences_waiting_for_a_slot():
    s = make(max_num_seqs=1, max_waiting=1)
    a, b, c = (seq([i, i + 1], max_tokens=3) for i in range(3))
    s.admit([a])  # takes the slot
    s.admit([b])  # waits for it: one waiting
    with pytest.raises(Overloaded, match="2 sequences are in flight for 1 batch slots .*max_waiting is 1"):
        s.admit([c])
    assert s.admission.num_in_flight == 2 and not c.admitted
    for q in (a, b):
        s.add(q)
    s.update(out := s.schedule(), {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    assert s.admission.num_waiting == 1 and s.admission.num_in_flight == 2
    with pytest.raises(Overloaded):  # a started but still holds the slot: b still waits for it
        s.admit([c])
    while not a.is_finished:
        s.update(out := s.schedule(), {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    assert s.admission.num_in_flight == 1  # a ended: b can take its slot, c can wait
    s.admit([c])
    s.add(c)
    run(s)
    assert (s.admission.num_waiting, s.admission.num_waiting_tokens, s.admission.num_in_flight) == (0, 0, 0)


def test_max_waiting_zero_admits_only_into_a_free_slot():
    s = make(max_num_seqs=2, max_waiting=0)
    a, b, c = (seq([i, i + 1], max_tokens=2 + i) for i in range(3))
    s.admit([a])
    s.admit([b])
    with pytest.raises(Overloaded, match="max_waiting is 0"):
        s.admit([c])
    for q in (a, b):
        s.add(q)
    while not a.is_finished:
        s.update(out := s.schedule(), {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    assert not b.is_finished
    s.admit([c])  # a's slot is free
    s.add(c)
    out = s.schedule()
    assert {x.seq for x in out.scheduled} == {b, c}  # c starts at the next step: no wait
    s.update(out, {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})
    run(s)


def test_admission_limits_the_waiting_prompt_tokens():
    s = make(max_waiting=100, max_waiting_tokens=10)
    s.admit([seq(range(1, 7))])  # 6 tokens
    with pytest.raises(Overloaded, match="6 prompt tokens are waiting to start, 5 more would pass "
                                         r"engine.max_waiting_tokens \(10\)"):
        s.admit([seq(range(1, 6))])
    s.admit([seq(range(1, 5))])  # 6 + 4 = 10 fits
    assert s.admission.num_waiting_tokens == 10


def test_an_empty_queue_admits_any_request():
    s = make(max_waiting=1, max_waiting_tokens=4)
    big = [seq(range(1, 20)), seq(range(1, 20))]  # n=2 choices of 19 tokens: over both limits
    s.admit(big)
    with pytest.raises(Overloaded):
        s.admit([seq([1])])


def test_aborted_and_preempted_sequences_leave_the_count_once():
    s = make(num_blocks=6, block_size=4, caching=False, max_num_batched_tokens=64, max_num_seqs=2,
             max_waiting=3)
    a, b, gone = seq(range(10, 18), max_tokens=8), seq(range(20, 28), max_tokens=8), seq([5, 6], max_tokens=2)
    s.admit([a, b])
    s.admit([gone])
    for q in (a, b, gone):
        s.add(q)
    s.abort(gone)  # ended while waiting
    assert s.admission.num_waiting == 2
    preempted = []
    run(s, on_step=lambda out: preempted.extend(out.preempted))
    assert preempted and s.admission.num_waiting == 0  # preemption is not counted twice
    assert (s.admission.num_admitted, s.admission.num_started, s.admission.num_ended) == (3, 3, 3)


def test_the_offline_path_is_not_counted():
    s = make(max_waiting=1)
    qs = [seq([i, i + 1]) for i in range(4)]
    for q in qs:
        s.add(q)  # LLM.generate adds without admit: no limit, no count
    run(s)
    assert s.admission.num_waiting == 0 and s.admission.num_started == 0


def test_admission_counters_hold_under_concurrent_admit_and_schedule():
    """The front end admits from threads while the 'engine' schedules: no update is lost and the
    queue never passes its limit."""
    import threading

    s = make(max_num_seqs=4, max_num_batched_tokens=64, max_waiting=8)
    refused, peak, stop = [], [0], threading.Event()
    inbox: list = []

    def front():
        for i in range(300):
            q = seq([i % 50 + 1, 2, 3], max_tokens=2)
            try:
                s.admit([q])
            except Overloaded:
                refused.append(q)
                continue
            inbox.append(q)  # list.append/pop are atomic under the GIL, like the engine's deque inbox

    def engine():
        while not stop.is_set() or inbox or s.has_work:
            while inbox:
                s.add(inbox.pop(0))
            peak[0] = max(peak[0], len(s.waiting) + len(s.running))
            if s.has_work:
                out = s.schedule()
                s.update(out, {x.seq_id: fake_next(x.token_ids) for x in out.to_sample})

    fronts = [threading.Thread(target=front) for _ in range(3)]
    eng = threading.Thread(target=engine)
    eng.start()
    for t in fronts:
        t.start()
    for t in fronts:
        t.join()
    stop.set()
    eng.join(30)
    a = s.admission
    assert a.num_admitted + len(refused) == 900 and a.num_admitted == a.num_started == a.num_ended
    assert a.num_waiting == 0 and a.num_waiting_tokens == 0 and peak[0] <= 4 + 8  # slots + max_waiting
    s.bm.check_integrity()
