"""A small, fast Prometheus metrics registry (text exposition format 0.0.4).

Pure Python with no dependencies so the engine records metrics without the web stack. Children
are looked up once per (labels) and kept, so recording is a list update and an add.
"""
from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _fmt_labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v)) if abs(v) < 1e15 else repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self._children: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str):
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def remove(self, *values: str) -> None:
        """Drop the children whose leading label values are ``values``."""
        prefix = tuple(str(v) for v in values)
        with self._lock:
            for key in [k for k in self._children if k[:len(prefix)] == prefix]:
                del self._children[key]

    def _new_child(self):
        raise NotImplementedError

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, child in list(self._children.items()):
            lines.extend(child.render(self.name, self.label_names, key))
        return lines


class _CounterChild:
    __slots__ = ("value", "fn")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set_function(self, fn: Callable[[], float]) -> None:
        """Read a monotonic count kept elsewhere (e.g. the block manager's) at scrape time."""
        self.fn = fn

    def render(self, name, names, values):
        v = self.fn() if self.fn is not None else self.value
        return [f"{name}{_fmt_labels(names, values)} {_num(v)}"]


class Counter(_Metric):
    kind = "counter"

    def _new_child(self):
        return _CounterChild()


class _GaugeChild:
    __slots__ = ("value", "fn")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float] | None = None

    def set(self, v: float) -> None:
        self.value = v

    def set_function(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    def render(self, name, names, values):
        v = self.fn() if self.fn is not None else self.value
        return [f"{name}{_fmt_labels(names, values)} {_num(v)}"]


class Gauge(_Metric):
    kind = "gauge"

    def _new_child(self):
        return _GaugeChild()


class _HistogramChild:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self, name, names, values):
        lines, acc = [], 0
        for bound, c in zip(self.buckets + (float("inf"),), self.counts):
            acc += c
            le = 'le="' + _num(bound) + '"'
            lines.append(f"{name}_bucket{_fmt_labels(names, values, le)} {acc}")
        lines.append(f"{name}_sum{_fmt_labels(names, values)} {_num(self.sum)}")
        lines.append(f"{name}_count{_fmt_labels(names, values)} {self.count}")
        return lines


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS_S) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets)

    def _new_child(self):
        return _HistogramChild(self.buckets)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


_ML = ("model", "version")


class TensorMetrics:
    """The tensor path's metric families, labelled by model and version."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.success = r.add(Counter("rtserve_inference_request_success_total", "Successful inference requests", _ML))
        self.failure = r.add(Counter("rtserve_inference_request_failure_total",
                                     "Failed inference requests by reason", _ML + ("reason",)))
        self.items = r.add(Counter("rtserve_inference_count_total", "Inferences performed (batch items)", _ML))
        self.executions = r.add(Counter("rtserve_inference_exec_count_total", "Batches executed", _ML))
        self.queue_s = r.add(Histogram("rtserve_queue_duration_seconds", "Time a request waited in the queue", _ML))
        self.compute_s = r.add(Histogram("rtserve_compute_duration_seconds",
                                         "Time to run one batch on the backend (per batch)", _ML))
        self.request_s = r.add(Histogram("rtserve_request_duration_seconds",
                                         "End-to-end request latency in the server, decode to encode", _ML))
        self.batch_size = r.add(Histogram("rtserve_batch_size", "Items per executed batch", _ML, BATCH_BUCKETS))
        self.queue_depth = r.add(Gauge("rtserve_queue_depth", "Requests waiting in the queue", _ML))
        self.in_flight = r.add(Gauge("rtserve_batches_in_flight", "Batches running on instances", _ML))

    def for_model(self, model: str, version: str) -> "ModelMetrics":
        return ModelMetrics(self, model, version)

    def drop(self, model: str, version: str) -> None:
        for m in (self.success, self.failure, self.items, self.executions, self.queue_s, self.compute_s,
                  self.request_s, self.batch_size, self.queue_depth, self.in_flight):
            m.remove(model, version)


class ModelMetrics:
    """Bound children for one model version: what the batcher and protocols record into."""

    def __init__(self, fam: TensorMetrics, model: str, version: str) -> None:
        self.fam, self.labels = fam, (model, version)
        self.success = fam.success.labels(model, version)
        self.items = fam.items.labels(model, version)
        self.executions = fam.executions.labels(model, version)
        self.queue_s = fam.queue_s.labels(model, version)
        self.compute_s = fam.compute_s.labels(model, version)
        self.request_s = fam.request_s.labels(model, version)
        self.batch_size = fam.batch_size.labels(model, version)
        self.queue_depth = fam.queue_depth.labels(model, version)
        self.in_flight = fam.in_flight.labels(model, version)

    def failed(self, reason: str) -> None:
        self.fam.failure.labels(*self.labels, reason).inc()


TOKEN_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LLMMetrics:
    """The generative path's metric families, labelled by model."""

    def __init__(self, registry: Registry) -> None:
        r, m = registry, ("model",)
        self.ttft = r.add(Histogram("rtserve_llm_time_to_first_token_seconds", "Time to first token", m, TOKEN_BUCKETS_S))
        self.itl = r.add(Histogram("rtserve_llm_inter_token_latency_seconds", "Time between streamed deltas", m,
                                   TOKEN_BUCKETS_S))
        self.e2e = r.add(Histogram("rtserve_llm_e2e_request_latency_seconds", "Request latency, arrival to last token", m,
                                   TOKEN_BUCKETS_S))
        self.queue = r.add(Histogram("rtserve_llm_request_queue_time_seconds", "Arrival to first scheduled", m,
                                     TOKEN_BUCKETS_S))
        self.running = r.add(Gauge("rtserve_llm_num_requests_running", "Sequences running", m))
        self.waiting = r.add(Gauge("rtserve_llm_num_requests_waiting", "Sequences waiting", m))
        self.kv_usage = r.add(Gauge("rtserve_llm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", m))
        self.prefix_queries = r.add(Counter("rtserve_llm_prefix_cache_queries_total", "Full prompt blocks looked up", m))
        self.prefix_hits = r.add(Counter("rtserve_llm_prefix_cache_hits_total", "Full prompt blocks found cached", m))
        self.prompt_tokens = r.add(Counter("rtserve_llm_prompt_tokens_total", "Prompt tokens of finished requests", m))
        self.generation_tokens = r.add(Counter("rtserve_llm_generation_tokens_total", "Generated tokens", m))
        self.requests = r.add(Counter("rtserve_llm_request_success_total", "Finished requests by reason", m +
                                      ("finished_reason",)))
        self.refused = r.add(Counter("rtserve_llm_request_refused_total",
                                     "Requests refused by admission control (429): the waiting queue was full", m))
        # speculative decoding (vLLM's spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens):
        # acceptance rate = accepted / draft tokens; tokens per verifying step = emitted / drafts
        self.spec_drafts = r.add(Counter("rtserve_llm_spec_decode_num_drafts_total",
                                         "Sequence-steps that verified speculative proposals", m))
        self.spec_draft_tokens = r.add(Counter("rtserve_llm_spec_decode_num_draft_tokens_total",
                                               "Speculative tokens proposed and verified", m))
        self.spec_accepted_tokens = r.add(Counter("rtserve_llm_spec_decode_num_accepted_tokens_total",
                                                  "Speculative tokens accepted", m))
        self.spec_emitted_tokens = r.add(Counter("rtserve_llm_spec_decode_num_emitted_tokens_total",
                                                 "Tokens output by the sequence-steps that verified proposals", m))
        self._bound: dict[int, object] = {}

    def bind(self, name: str, scheduler, spec_stats=None) -> None:
        """Point the gauges and cache counters of ``name`` at a scheduler (once per engine), and the
        speculative-decoding counters at ``spec_stats`` (``llm.speculative.speculator.SpecStats``) if given."""
        if self._bound.get(id(scheduler)) is not None:
            return
        self._bound[id(scheduler)] = scheduler
        if spec_stats is not None:
            st = spec_stats
            self.spec_drafts.labels(name).set_function(lambda: st.num_drafts)
            self.spec_draft_tokens.labels(name).set_function(lambda: st.num_draft_tokens)
            self.spec_accepted_tokens.labels(name).set_function(lambda: st.num_accepted_tokens)
            self.spec_emitted_tokens.labels(name).set_function(lambda: st.num_emitted_tokens)
        bm = scheduler.bm
        self.running.labels(name).set_function(lambda: len(scheduler.running))
        self.waiting.labels(name).set_function(lambda: len(scheduler.waiting))
        self.kv_usage.labels(name).set_function(lambda: bm.usage)
        self.prefix_queries.labels(name).set_function(lambda: bm.num_prefix_queries)
        self.prefix_hits.labels(name).set_function(lambda: bm.num_prefix_hits)

    def bind_stats(self, name: str, engine, speculative: bool) -> None:
        """The same gauges and counters for an engine in another process (``engine_core: process``):
        read from ``engine.stats``, the ``EngineStats`` its last step sent."""
        self.running.labels(name).set_function(lambda: engine.stats.running)
        self.waiting.labels(name).set_function(lambda: engine.stats.waiting)
        self.kv_usage.labels(name).set_function(lambda: engine.stats.kv_usage)
        self.prefix_queries.labels(name).set_function(lambda: engine.stats.prefix_queries)
        self.prefix_hits.labels(name).set_function(lambda: engine.stats.prefix_hits)
        if speculative:
            for i, family in enumerate((self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens,
                                        self.spec_emitted_tokens)):
                family.labels(name).set_function(lambda i=i: (engine.stats.spec or (0, 0, 0, 0))[i])


class EmbeddingMetrics:
    """The embedding path's metric families, labelled by model; batch counters are read from the
    model at scrape time (inputs / batches = mean batch size)."""

    def __init__(self, registry: Registry) -> None:
        r, m = registry, ("model",)
        self.requests = r.add(Counter("rtserve_embedding_requests_total", "Embedding requests by outcome",
                                      m + ("outcome",)))
        self.latency = r.add(Histogram("rtserve_embedding_request_duration_seconds",
                                       "Embedding request latency, body parsed to response encoded", m))
        self.prompt_tokens = r.add(Counter("rtserve_embedding_prompt_tokens_total", "Tokens embedded", m))
        self.batches = r.add(Counter("rtserve_embedding_batches_total", "Forward passes run", m))
        self.inputs = r.add(Counter("rtserve_embedding_inputs_total", "Inputs embedded", m))
        self._bound: dict[str, object] = {}

    def bind(self, model) -> None:
        """Point the batch counters of ``model.name`` at this model object (again after a reload)."""
        if self._bound.get(model.name) is model:
            return
        self._bound[model.name] = model
        self.batches.labels(model.name).set_function(lambda: model.num_batches)
        self.inputs.labels(model.name).set_function(lambda: model.num_inputs)


class ScoringMetrics:
    """The cross-encoder path's families (``/v1/rerank``, ``/v1/score``), labelled by model; the
    batch counters are read from the model at scrape time (pairs / batches = mean batch size)."""

    def __init__(self, registry: Registry) -> None:
        r, m = registry, ("model",)
        self.requests = r.add(Counter("rtserve_score_requests_total", "Rerank and score requests by outcome",
                                      m + ("outcome",)))
        self.latency = r.add(Histogram("rtserve_score_request_duration_seconds",
                                       "Rerank and score latency, body parsed to scores computed", m))
        self.tokens = r.add(Counter("rtserve_score_tokens_total", "Tokens scored (pairs, special tokens included)", m))
        self.batches = r.add(Counter("rtserve_score_batches_total", "Forward passes run", m))
        self.pairs = r.add(Counter("rtserve_score_pairs_total", "Pairs scored", m))
        self._bound: dict[str, object] = {}

    def bind(self, model) -> None:
        """Point the batch counters of ``model.name`` at this model object (again after a reload)."""
        if self._bound.get(model.name) is model:
            return
        self._bound[model.name] = model
        self.batches.labels(model.name).set_function(lambda: model.num_batches)
        self.pairs.labels(model.name).set_function(lambda: model.num_pairs)


class ServingMetrics:
    """Every model kind's metric families in one registry: a kind records into its own."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.tensor = TensorMetrics(registry)
        self.llm = LLMMetrics(registry)
        self.embedding = EmbeddingMetrics(registry)
        self.scoring = ScoringMetrics(registry)

    def drop(self, model: str, version: str) -> None:
        """Forget an unloaded tensor model version's children."""
        self.tensor.drop(model, version)
