"""Dynamic batching across requests for encoder kinds: a bounded queue of requests and one worker
thread that takes everything waiting (up to ``max_batch_size`` items, a request never split) and
runs it in one call, then answers each request's future on its event loop.

The event loop only enqueues (``submit``) and awaits; the worker runs ``run(items) -> array`` (one
row per item, in order). A request whose client went away (its future cancelled) before the worker
took it is dropped, not computed. The embedding kind has the same loop inline (``embedding.py``).
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import QueueFull, Unavailable


class WorkerClosed(Exception):
    """``submit`` after ``close``: the caller may hand the request to a replacement version."""


@dataclass
class Job:
    """One request in the queue: its items, answered through ``future`` on ``loop``."""

    items: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class EncoderWorker:
    def __init__(self, name: str, run: Callable[[list], np.ndarray], max_batch_size: int,
                 max_queue_size: int) -> None:
        self.name, self.run = name, run
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    async def submit(self, items: list) -> np.ndarray:
        """Queue one request; its rows once computed. QueueFull (503) when ``max_queue_size``
        requests wait; WorkerClosed after ``close``."""
        loop = asyncio.get_running_loop()
        job = Job(items, loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise WorkerClosed()
            if len(self._jobs) >= self.max_queue_size:
                raise QueueFull(f"model '{self.name}': the queue is full ({len(self._jobs)} requests waiting)")
            self._jobs.append(job)
            self._cond.notify()
        return await job.future

    def _take(self) -> list[Job] | None:
        """Block until requests wait; take them up to ``max_batch_size`` items (the first whatever its
        size). None once closed and drained."""
        with self._cond:
            while True:
                while self._jobs and self._jobs[0].future.done():  # cancelled: the client is gone
                    self._jobs.popleft()
                if self._jobs:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            jobs = [self._jobs.popleft()]
            size = len(jobs[0].items)
            while self._jobs and size + len(self._jobs[0].items) <= self.max_batch_size:
                job = self._jobs.popleft()
                if not job.future.done():
                    size += len(job.items)
                    jobs.append(job)
            return jobs

    def _main(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                rows = self.run([x for j in jobs for x in j.items])
            except Exception as e:  # answer this batch with the error; keep serving
                for j in jobs:
                    j.loop.call_soon_threadsafe(_resolve, j.future, None, e)
                continue
            start = 0
            for j in jobs:
                n = len(j.items)
                j.loop.call_soon_threadsafe(_resolve, j.future, rows[start:start + n], None)
                start += n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"encoder-{self.name}", daemon=True)
        self._thread.start()

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Finish what is queued (bounded by ``drain_timeout_s``), then answer the rest with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, drain_timeout_s)
        with self._cond:
            left, self._jobs = list(self._jobs), deque()
        for j in left:
            j.loop.call_soon_threadsafe(_resolve, j.future, None, Unavailable(f"model '{self.name}' was unloaded"))


def _resolve(fut: asyncio.Future, result, error: BaseException | None) -> None:
    if fut.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
