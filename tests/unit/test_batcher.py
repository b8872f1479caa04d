"""Batcher with fake backends: slicing, priorities, deadlines, cancellation, bounds, instances."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rtserve.batching import DynamicBatcher, InferRequest
from rtserve.config import BatchingConfig
from rtserve.errors import BackendError, Cancelled, DeadlineExceeded, InvalidInput, QueueFull
from rtserve.metrics import Registry, TensorMetrics


class FakeBackend:
    """Records every batch; output row = input row * 10 + position of the row in its batch."""

    def __init__(self, gate: threading.Event | None = None, fail_on: float | None = None):
        self.batches: list[np.ndarray] = []
        self.gate = gate
        self.fail_on = fail_on
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def __call__(self, inputs):
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.gate is not None:
                assert self.gate.wait(5)
            x = inputs["x"]
            self.batches.append(x.copy())
            if self.fail_on is not None and (x == self.fail_on).any():
                raise RuntimeError("boom")
            pos = np.arange(x.shape[0], dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return {"y": x * 10 + pos}
        finally:
            with self._lock:
                self.concurrent -= 1


def req(values, priority=0, timeout_s=None, width=2):
    arr = np.array(values, dtype=np.float32).reshape(-1, 1).repeat(width, axis=1)
    return InferRequest(inputs={"x": arr}, batch_size=arr.shape[0], priority=priority, timeout_s=timeout_s)


def make(backends, max_batch=8, **cfg):
    metrics = TensorMetrics(Registry()).for_model("m", "1")
    b = DynamicBatcher("m", backends, max_batch, BatchingConfig(**cfg), metrics)
    b.start()
    return b, metrics


async def _blocked_first(b, gate):
    """Submit one request that occupies the only instance until ``gate`` opens."""
    first = b.submit(req([0]))
    while b.num_running == 0:
        await asyncio.sleep(0.001)
    return first


def test_each_request_gets_its_own_slice_of_a_mixed_batch():
    async def main():
        gate = threading.Event()
        fb = FakeBackend(gate)
        b, m = make([fb], max_batch=16)
        first = await _blocked_first(b, gate)
        r1, r2, r3 = req([1]), req([2, 3, 4]), req([5, 6])
        futs = [b.submit(r) for r in (r1, r2, r3)]
        gate.set()
        await first
        outs = await asyncio.gather(*futs)
        # the three queued requests ran as one batch of 6 rows
        assert [len(x) for x in fb.batches] == [1, 6]
        np.testing.assert_array_equal(outs[0]["y"][:, 0], [10 + 0])
        np.testing.assert_array_equal(outs[1]["y"][:, 0], [20 + 1, 30 + 2, 40 + 3])
        np.testing.assert_array_equal(outs[2]["y"][:, 0], [50 + 4, 60 + 5])
        assert m.batch_size.count == 2 and m.items.value == 7
        await b.close()

    asyncio.run(main())


def test_higher_priority_runs_first_and_batches_respect_max_size():
    async def main():
        gate = threading.Event()
        fb = FakeBackend(gate)
        b, _ = make([fb], max_batch=2, priority_levels=3)
        first = await _blocked_first(b, gate)
        futs = [b.submit(req([v], priority=p)) for v, p in [(1, 0), (2, 0), (3, 2), (4, 1), (5, 2)]]
        gate.set()
        await first
        await asyncio.gather(*futs)
        order = [list(x[:, 0]) for x in fb.batches[1:]]
        assert order == [[3, 5], [4, 1], [2]]
        await b.close()

    asyncio.run(main())


def test_expired_request_gets_timeout_and_is_never_computed():
    async def main():
        gate = threading.Event()
        fb = FakeBackend(gate)
        b, m = make([fb])
        first = await _blocked_first(b, gate)
        late = b.submit(req([7], timeout_s=0.03))
        ok = b.submit(req([8]))
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="timed out"):
            await late
        assert time.perf_counter() - t0 < 1.0  # answered by its timer, not when the instance frees
        gate.set()
        await first
        await ok
        assert all(7 not in batch[:, 0] for batch in fb.batches)
        assert len(b.queue) == 0
        await b.close()

    asyncio.run(main())


def test_default_timeout_from_config():
    async def main():
        gate = threading.Event()
        b, _ = make([FakeBackend(gate)], default_timeout_ms=20)
        first = b.submit(req([0], timeout_s=10))
        while b.num_running == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(DeadlineExceeded):
            await b.submit(req([1]))
        gate.set()
        await first
        await b.close()

    asyncio.run(main())


def test_full_queue_rejects_at_once():
    async def main():
        gate = threading.Event()
        b, _ = make([FakeBackend(gate)], max_queue_size=2)
        first = await _blocked_first(b, gate)
        a, c = b.submit(req([1])), b.submit(req([2]))
        with pytest.raises(QueueFull) as e:
            b.submit(req([3]))
        assert e.value.status == 503 and e.value.headers["retry-after"]
        gate.set()
        await asyncio.gather(first, a, c)
        b.submit(req([4]))  # room again
        await b.close()

    asyncio.run(main())


def test_cancelled_request_is_not_computed():
    async def main():
        gate = threading.Event()
        fb = FakeBackend(gate)
        b, _ = make([fb])
        first = await _blocked_first(b, gate)
        r = req([9])
        fut = b.submit(r)
        b.cancel(r)
        with pytest.raises(Cancelled):
            await fut
        gate.set()
        await first
        await b.submit(req([1]))
        assert all(9 not in batch[:, 0] for batch in fb.batches)
        assert len(b.queue) == 0
        await b.close()

    asyncio.run(main())


def test_incompatible_shapes_are_not_merged():
    async def main():
        gate = threading.Event()
        fb = FakeBackend(gate)
        b, _ = make([fb])
        first = await _blocked_first(b, gate)
        f1 = b.submit(req([1], width=2))
        f2 = b.submit(req([2], width=3))
        f3 = b.submit(req([3], width=2))
        gate.set()
        await asyncio.gather(first, f1, f2, f3)
        shapes = sorted(x.shape for x in fb.batches[1:])
        assert shapes == [(1, 3), (2, 2)]
        await b.close()

    asyncio.run(main())


def test_backend_failure_answers_batch_and_keeps_serving():
    async def main():
        fb = FakeBackend(fail_on=13)
        b, m = make([fb])
        with pytest.raises(BackendError, match="boom"):
            await b.submit(req([13]))
        out = await b.submit(req([1]))
        assert out["y"][0, 0] == 10
        await b.close()

    asyncio.run(main())


def test_instances_run_batches_concurrently():
    async def main():
        barrier = threading.Barrier(2, timeout=5)

        class Meet(FakeBackend):
            def __call__(self, inputs):
                barrier.wait()  # both instances must be inside run() at once
                return super().__call__(inputs)

        backs = [Meet(), Meet()]
        b, _ = make(backs, max_batch=1)
        outs = await asyncio.gather(b.submit(req([1])), b.submit(req([2])))
        assert sorted(o["y"][0, 0] for o in outs) == [10, 20]
        await b.close()

    asyncio.run(main())


def test_rejects_oversized_batch_and_bad_priority():
    async def main():
        b, _ = make([FakeBackend()], max_batch=2, priority_levels=2)
        with pytest.raises(InvalidInput, match="exceeds max_batch_size"):
            b.submit(req([1, 2, 3]))
        with pytest.raises(InvalidInput, match="priority"):
            b.submit(req([1], priority=5))
        await b.close()

    asyncio.run(main())


def test_queue_delay_is_an_upper_bound_not_a_fixed_wait():
    async def main():
        fb = FakeBackend()
        b, _ = make([fb], max_batch=32, max_queue_delay_ms=300)
        t0 = time.perf_counter()
        for _ in range(3):  # lone requests, well spaced: none waits for the delay
            await b.submit(req([1]))
            await asyncio.sleep(0.05)
        assert time.perf_counter() - t0 < 0.15 + 0.25
        await b.close()

    asyncio.run(main())


def test_unbatched_model_runs_requests_alone():
    async def main():
        fb = FakeBackend()
        b, _ = make([fb], max_batch=0)
        outs = await asyncio.gather(b.submit(req([1, 2])), b.submit(req([3])))
        assert outs[0]["y"].shape == (2, 2) and outs[1]["y"].shape == (1, 2)
        assert sorted(len(x) for x in fb.batches) == [1, 2]
        await b.close()

    asyncio.run(main())


def test_preferred_batch_size_cuts_when_another_instance_is_idle():
    async def main():
        a, b = FakeBackend(), FakeBackend()
        bat, _ = make([a, b], max_batch=16, preferred_batch_sizes=[8])
        await asyncio.sleep(0.05)  # both instance threads are waiting for work
        # The loop thread holds the GIL through these submits, so both instances wake to 13 queued
        # requests; the first to take sees the other idle and cuts to the preferred 8, the other
        # takes the remaining 5 at once (without preferred sizes one instance would take all 13).
        futs = [bat.submit(req([i])) for i in range(13)]
        await asyncio.gather(*futs)
        assert sorted(len(x) for x in a.batches + b.batches) == [5, 8]
        await bat.close()

    asyncio.run(main())
