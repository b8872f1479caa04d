"""Bounded priority queue of requests: higher priority first, earliest deadline first within a
priority, arrival order among equal deadlines. Entries that expire or are cancelled while queued
are skipped lazily when popped; ``num_queued`` counts only live ones.
"""
from __future__ import annotations

import heapq

from .request import InferRequest, RequestState


class RequestQueue:
    def __init__(self, max_size: int, priority_levels: int) -> None:
        self.max_size = max_size
        self._heaps: list[list[tuple[float, int, InferRequest]]] = [[] for _ in range(priority_levels)]
        self.num_queued = 0

    def __len__(self) -> int:
        return self.num_queued

    @property
    def full(self) -> bool:
        return self.num_queued >= self.max_size

    def push(self, req: InferRequest) -> None:
        heapq.heappush(self._heaps[req.priority], (req.deadline, req.seq, req))
        self.num_queued += 1

    def forget(self) -> None:
        """A queued request left the queue early (deadline passed, or cancelled)."""
        self.num_queued -= 1

    def peek(self) -> InferRequest | None:
        for heap in reversed(self._heaps):
            while heap and heap[0][2].state is not RequestState.QUEUED:
                heapq.heappop(heap)
            if heap:
                return heap[0][2]
        return None

    def take(self, max_items: int, budget: int, any_signature: bool = False) -> list[InferRequest]:
        """Pop live requests in priority order whose signature matches the first one's (any, with
        ``any_signature``) and whose batch sizes add up to at most ``budget``; ``max_items`` caps
        the count. Requests that do not fit or do not match stay queued in their order.
        """
        taken: list[InferRequest] = []
        skipped: list[tuple[float, int, InferRequest]] = []
        used = 0
        signature = None
        for heap in reversed(self._heaps):
            while heap and len(taken) < max_items and used < budget:
                entry = heapq.heappop(heap)
                req = entry[2]
                if req.state is not RequestState.QUEUED:
                    continue
                if signature is None:
                    signature = req.signature
                if (not any_signature and req.signature != signature) or used + req.batch_size > budget:
                    skipped.append(entry)
                    if len(skipped) > 64:  # do not scan a long queue for a fit
                        break
                    continue
                taken.append(req)
                used += req.batch_size
            for entry in skipped:
                heapq.heappush(heap, entry)
            skipped.clear()
            if len(taken) >= max_items or used >= budget:
                break
        self.num_queued -= len(taken)
        return taken
