"""``models.encoder_worker.EncoderWorker`` with a fake ``run`` (no model): what it batches, what it
drops, how it fails and closes. Milliseconds."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rtserve.errors import QueueFull, Unavailable
from rtserve.models.encoder_worker import EncoderWorker, WorkerClosed


class Fake:
    """run(items) -> items * 10, recording each call's items; ``gate`` holds the worker."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list) -> np.ndarray:
        self.gate.wait(5)
        self.calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return np.asarray(items, dtype=np.float32) * 10


def test_requests_share_calls_up_to_max_batch_size_and_get_their_rows():
    fake = Fake()
    w = EncoderWorker("m", fake, max_batch_size=4, max_queue_size=16)

    async def main():
        tasks = [asyncio.ensure_future(w.submit(items)) for items in ([1], [2, 3], [4], [5, 6, 7, 8, 9], [10])]
        await asyncio.sleep(0)
        w.start()
        out = await asyncio.gather(*tasks)
        await w.close()
        return out

    out = asyncio.run(main())
    assert fake.calls == [[1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]  # a request is never split, the first taken whole
    assert [list(o) for o in out] == [[10], [20, 30], [40], [50, 60, 70, 80, 90], [100]]


def test_cancelled_requests_are_not_run_a_failure_answers_its_batch_and_a_full_queue_refuses():
    fake = Fake()
    w = EncoderWorker("m", fake, max_batch_size=8, max_queue_size=3)

    async def main():
        a = asyncio.ensure_future(w.submit([1]))
        b = asyncio.ensure_future(w.submit([2]))
        c = asyncio.ensure_future(w.submit(["boom"]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await w.submit([4])
        b.cancel()  # the client went away while queued
        w.start()
        with pytest.raises(RuntimeError, match="boom"):
            await c
        with pytest.raises(RuntimeError):  # same batch as the failing one
            await a
        assert list(await w.submit([5])) == [50]  # still serving
        await w.close()
        with pytest.raises(WorkerClosed):
            await w.submit([6])

    asyncio.run(main())
    assert fake.calls == [[1, "boom"], [5]]


def test_close_answers_what_it_could_not_finish_with_503():
    fake = Fake()
    fake.gate.clear()  # the worker is stuck in its first call
    w = EncoderWorker("m", fake, max_batch_size=1, max_queue_size=8)

    async def main():
        w.start()
        first = asyncio.ensure_future(w.submit([1]))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(w.submit([2]))
        await asyncio.sleep(0)
        await w.close(drain_timeout_s=0.05)
        with pytest.raises(Unavailable):
            await second
        fake.gate.set()
        assert list(await first) == [10]

    asyncio.run(main())
