"""Dynamic batcher: a bounded priority queue per model, gathered into batches that run on the
model's instances, each instance one batch at a time, instances side by side.

Threads: each instance is a thread that takes its next batch from the queue itself (under a lock)
the moment it is free, so compute never waits for the event loop, which may be saturated by
connection handling under overload. The event loop only queues requests, runs deadline timers and
resolves futures (``_deliver``); a future is never touched from an instance thread.

Policy (see docs/architecture.md):
- An idle instance takes what is waiting at once, up to ``max_batch_size``; requests that arrive
  while every instance is busy gather into the next batch. ``max_queue_delay_ms`` is an upper bound:
  an idle instance holds a partial batch only when the recent arrival rate predicts that the batch
  fills within the time the oldest request has left, so a lone request is never delayed.
- With preferred batch sizes, a batch is cut to the largest preferred size when another idle
  instance takes the rest at once (no latency cost), and the fill target is the next preferred size.
- Requests whose deadline passes while queued are answered with ``DeadlineExceeded`` by a timer and
  never computed; a cancelled request (client gone) is dropped before it runs.
- A full queue raises ``QueueFull`` (HTTP 503 + Retry-After) at once.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import BackendError, Cancelled, DeadlineExceeded, InvalidInput, QueueFull, RtserveError, Unavailable
from ..config import BatchingConfig
from ..metrics import ModelMetrics
from .queue import RequestQueue
from .request import InferRequest, RequestState

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _execute(run: RunFn, batch: list[InferRequest], batched: bool) -> tuple[list[dict], float]:
    """In an executor thread: concatenate inputs, run, slice outputs back per request."""
    t0 = time.perf_counter()
    if not batched or len(batch) == 1:
        inputs = batch[0].inputs
    else:
        inputs = {k: np.concatenate([r.inputs[k] for r in batch]) for k in batch[0].inputs}
    outputs = run(inputs)
    if not batched or len(batch) == 1:
        per_request = [outputs]
    else:
        per_request, start = [], 0
        for r in batch:
            end = start + r.batch_size
            per_request.append({k: v[start:end] for k, v in outputs.items()})
            start = end
    return per_request, time.perf_counter() - t0


class DynamicBatcher:
    """Queue + batch formation + dispatch for one model version.

    Args:
        name: model name (for messages).
        runners: one ``run(inputs) -> outputs`` callable per instance.
        max_batch_size: 0 = the model does not batch: each request runs alone, as given.
        config: the batching policy.
        metrics: where queue, compute and batch figures are recorded (optional).

    Locking: ``_cond`` (and its lock) guards the queue, request states while queued, the arrival
    statistics and the counters; futures and metrics are only touched on the event loop.
    """

    def __init__(self, name: str, runners: Sequence[RunFn], max_batch_size: int,
                 config: BatchingConfig, metrics: ModelMetrics | None = None) -> None:
        self.name = name
        self.runners = list(runners)
        self.max_batch_size = max_batch_size
        self.config = config
        self.metrics = metrics
        self.queue = RequestQueue(config.max_queue_size, config.priority_levels)
        self._cond = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_arrival = 0.0
        self._gap_ewma = float("inf")  # seconds between arrivals, smoothed
        self._num_idle = 0
        self.num_running = 0
        self._closed = False
        if metrics is not None:
            metrics.queue_depth.set_function(lambda: self.queue.num_queued)
            metrics.in_flight.set_function(lambda: self.num_running)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for i, run in enumerate(self.runners):
            t = threading.Thread(target=self._instance_main, args=(run,), name=f"rtserve-{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running. Returns False on timeout."""
        end = time.monotonic() + timeout_s
        while self.queue.num_queued or self.num_running:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        """Stop the instances; requests still queued are answered with 503."""
        with self._cond:
            self._closed = True
            leftovers = self.queue.take(1 << 62, 1 << 62, any_signature=True)
            for r in leftovers:
                r.state = RequestState.DONE
            self._cond.notify_all()
        for r in leftovers:
            r.fail(Unavailable(f"model '{self.name}' was unloaded before the request ran"))
        threads, self._threads = self._threads, []
        await asyncio.to_thread(lambda: [t.join(30) for t in threads])

    # -- submission (event loop) ----------------------------------------------------------------
    def submit(self, req: InferRequest) -> asyncio.Future:
        """Queue ``req`` and return the future of its outputs. Raises at once when it cannot queue."""
        if self._closed:
            raise Unavailable(f"model '{self.name}' is not serving")
        if self.max_batch_size and req.batch_size > self.max_batch_size:
            raise InvalidInput(
                f"model '{self.name}': batch size {req.batch_size} exceeds max_batch_size {self.max_batch_size}")
        if not 0 <= req.priority < self.config.priority_levels:
            raise InvalidInput(
                f"model '{self.name}': priority {req.priority} is not in 0..{self.config.priority_levels - 1}")
        loop = self._loop
        req.future = loop.create_future()
        timeout = req.timeout_s if req.timeout_s is not None else (self.config.default_timeout_ms / 1000 or None)
        with self._cond:
            if self.queue.full:
                req.future = None
                self.reject_full()
            now = time.monotonic()
            req.arrival = now
            req.seq = next(self._seq)
            if timeout:
                req.deadline = now + timeout
            gap = now - self._last_arrival
            self._gap_ewma = gap if self._gap_ewma == float("inf") else 0.8 * self._gap_ewma + 0.2 * gap
            self._last_arrival = now
            self.queue.push(req)
            self._cond.notify()
        if timeout:
            req.timer = loop.call_later(timeout, self._expire, req)
        return req.future

    def reject_full(self) -> None:
        if self.metrics:
            self.metrics.failed("queue_full")
        raise QueueFull(f"model '{self.name}': queue is full ({self.queue.max_size} requests waiting)")

    def _dequeue_early(self, req: InferRequest) -> bool:
        with self._cond:
            if req.state is not RequestState.QUEUED:
                return False
            req.state = RequestState.DONE
            self.queue.forget()
            return True

    def cancel(self, req: InferRequest) -> None:
        """The client went away: drop the request if it has not started."""
        if self._dequeue_early(req):
            req.fail(Cancelled("client disconnected before the request ran"))
            if self.metrics:
                self.metrics.failed("cancelled")

    def _expire(self, req: InferRequest) -> None:
        if self._dequeue_early(req):
            req.fail(DeadlineExceeded(
                f"model '{self.name}': request timed out after {(req.deadline - req.arrival) * 1000:.0f} ms in the queue"))
            if self.metrics:
                self.metrics.failed("timeout")

    # -- batch formation (instance threads, under the lock) ------------------------------------
    def _fill_target(self, available: int) -> int:
        for size in self.config.preferred_batch_sizes:
            if size > available:
                return min(size, self.max_batch_size)
        return self.max_batch_size

    def _wait_to_fill(self) -> None:
        """Hold a partial batch while arrivals predict it fills within the oldest request's bound."""
        delay = self.config.max_queue_delay_ms / 1000
        while not self._closed:
            oldest = self.queue.peek()
            available = self.queue.num_queued
            if oldest is None or self._num_idle:
                return
            target = self._fill_target(available)
            if available >= target:
                return
            remaining = oldest.arrival + delay - time.monotonic()
            if remaining <= 0 or (target - available) * self._gap_ewma > remaining:
                return
            self._cond.wait(remaining)

    def _take_batch(self) -> list[InferRequest]:
        if not self.max_batch_size:
            batch = self.queue.take(1, 1 << 62)
        else:
            budget = self.max_batch_size
            preferred = self.config.preferred_batch_sizes
            if preferred and self._num_idle:
                fitting = [s for s in preferred if s <= self.queue.num_queued]
                if fitting and self.queue.num_queued > fitting[-1]:
                    budget = min(budget, fitting[-1])  # the rest goes to the idle instance now
            batch = self.queue.take(budget, budget)
        now = time.monotonic()
        for r in batch:
            r.state = RequestState.RUNNING
            r.started = now
        return batch

    def _instance_main(self, run: RunFn) -> None:
        batched = self.max_batch_size > 0
        wait_to_fill = batched and self.config.max_queue_delay_ms > 0
        cond = self._cond
        while True:
            with cond:
                while not self._closed and not self.queue.num_queued:
                    self._num_idle += 1
                    cond.wait()
                    self._num_idle -= 1
                if self._closed:
                    return
                if wait_to_fill:
                    self._wait_to_fill()
                batch = self._take_batch()
                if not batch:
                    continue
                self.num_running += 1
                if self._num_idle and self.queue.num_queued:
                    cond.notify()  # leftovers: an idle instance takes them now
            error: BaseException | None = None
            per_request, compute_s = None, 0.0
            try:
                per_request, compute_s = _execute(run, batch, batched)
            except BaseException as e:  # answered on the loop; the instance goes on serving
                error = e
            with cond:
                self.num_running -= 1
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch, per_request, compute_s, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    # -- answers (event loop) ------------------------------------------------------------------
    def _deliver(self, batch: list[InferRequest], per_request, compute_s: float, error) -> None:
        m = self.metrics
        if error is not None:
            err = error if isinstance(error, RtserveError) else BackendError(
                f"model '{self.name}': backend failed: {type(error).__name__}: {error}")
            for r in batch:
                r.fail(err)
            if m:
                m.failed("backend")
            return
        if m:
            for r in batch:
                m.queue_s.observe(r.started - r.arrival)
            m.compute_s.observe(compute_s)
            m.executions.inc()
            items = sum(r.batch_size for r in batch)
            m.items.inc(items)
            m.batch_size.observe(items)
        for r, out in zip(batch, per_request):
            r.finish(out)
