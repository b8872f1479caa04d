"""What one load-generator run measured (:class:`LoadResult`), filled in by the runner as answers
arrive and summarised after the run."""
from __future__ import annotations

from dataclasses import dataclass, field

from .report import percentile


@dataclass
class LoadResult:
    """What one run measured. Only requests started (closed loop) or scheduled (open loop) in the
    measured window, after the warm-up, are counted."""

    mode: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    duration_s: float
    # (left out of repr: asyncio reprs a finished task's result, and these can hold millions)
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # 2xx answers only
    error_latencies_ms: list[float] = field(default_factory=list, repr=False)  # non-2xx answers
    status_counts: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # no answer: timeout, reset, refused, ...
    unanswered: int = 0  # still without an answer when the drain timeout ran out
    reconnects: int = 0  # kept-alive connections the server closed
    connections: int = 0  # connections opened in all (warm-up included)
    late_arrivals: int = 0  # open loop: arrivals the client sent later than TIMER_SLACK_S (CPU-starved)
    # From the start of the measured window to the last counted answer. Well above duration_s, the
    # answers trailed in during the drain: the server (or the client) fell behind the offered load, and
    # num_ok / elapsed_s, not throughput, is the rate it really served.
    elapsed_s: float = 0.0

    @property
    def num_ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def num_requests(self) -> int:
        return sum(self.status_counts.values()) + sum(self.errors.values()) + self.unanswered

    @property
    def throughput(self) -> float:
        """Successful (2xx) answers per second of the measured window."""
        return self.num_ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    def summary(self) -> dict:
        non_2xx = sum(n for s, n in self.status_counts.items() if not 200 <= s < 300)
        lat = self.latencies_ms
        return {
            "throughput": self.throughput, "p50": self.percentile(50), "p90": self.percentile(90),
            "p99": self.percentile(99), "max": max(lat) if lat else float("nan"),
            "mean": sum(lat) / len(lat) if lat else float("nan"), "ok": self.num_ok,
            "errors": non_2xx + sum(self.errors.values()), "status_counts": dict(sorted(self.status_counts.items())),
            "unanswered": self.unanswered, "reconnects": self.reconnects, "elapsed_s": self.elapsed_s,
        }
