"""How the engine thread's output reaches the requests on the event loop, and why it coalesces.

Profiled under load (benchmarks/llm_serving.py --profile, py-spy --gil, 64 streaming clients on 2
cores), the event loop's thread held the GIL in 30% of the samples where any thread held it, its
largest part in ``transport.write`` -- one socket write, through loopback TCP into the client, per
token per stream -- and much of the rest in waking one task per token. The engine takes the GIL
back after every tensor operation, so every millisecond the loop holds it per token is taken from
the engine's step (and on a busy machine a loop thread descheduled while holding it stalls the step).

So the hop is per step, not per token, and it never queues behind itself: the engine thread appends
a step's deltas to its loop's :class:`Outbox` and schedules one callback only when none is pending;
if the loop is behind (busy with a previous step, or the clients are slower than the engine), the
next steps' deltas join the pending ones and the loop takes them all in one callback. Each request
has a :class:`Mailbox` (a list and at most one waiting future, not an ``asyncio.Queue``); its stream
takes everything waiting at once and :func:`coalesce` merges it into one delta per choice, so a
slow loop or client gets fewer, larger SSE chunks (several tokens each: text joined, token ids and
logprobs lists concatenated -- the OpenAI stream shape is unchanged, only the chunk count) instead
of a growing backlog of one-token chunks. When the loop keeps up, nothing changes: one delta per
token per step, as before.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterable


class Mailbox:
    """One request's deltas, put on the event loop; ``take`` returns all that are waiting."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class Outbox:
    """Engine thread -> one event loop: deltas (with their mailboxes) gather here until the loop
    runs the one pending ``flush`` callback; a closed loop drops them (nobody is listening)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    def push(self, items: Iterable) -> None:
        """Engine thread: add ``(mailbox, delta)`` pairs; wakes the loop once until it flushes."""
        with self._lock:
            self._items.extend(items)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # the loop is closed: its requests are gone
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def flush(self) -> None:
        """Event loop: hand everything gathered so far to the mailboxes."""
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for box, delta in items:
            box.put(delta)


def outbox_for(outboxes: dict, loop: asyncio.AbstractEventLoop) -> Outbox:
    """The outbox of ``loop`` in ``outboxes`` (made on first use; those of closed loops dropped).
    Call under the lock that guards ``outboxes``."""
    outbox = outboxes.get(loop)
    if outbox is None:
        for closed in [x for x in outboxes if x.is_closed()]:
            del outboxes[closed]
        outbox = outboxes[loop] = Outbox(loop)
    return outbox


def _join(a, b) -> list | None:
    if a is None:
        return b
    return a if b is None else a + b


def merge(a, b):
    """Two consecutive deltas of one choice as one (``b`` came after ``a``)."""
    return dataclasses.replace(
        b, text=a.text + b.text, token_ids=a.token_ids + b.token_ids, logprobs=_join(a.logprobs, b.logprobs),
        queue_s=a.queue_s, prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        num_cached_tokens=max(a.num_cached_tokens, b.num_cached_tokens))


def coalesce(deltas: list) -> list:
    """One delta per choice ``index`` (in the order the choices first appear), each the merge of
    that choice's deltas in order."""
    if len(deltas) == 1:
        return deltas
    out: dict[int, object] = {}
    for d in deltas:
        prev = out.get(d.index)
        out[d.index] = d if prev is None else merge(prev, d)
    return list(out.values())
