"""What a compression did, measured: size, parameters, latency and fidelity of source and result.

Every figure is computed here from the files and from runs on this machine, never copied from a
recipe. Latency of source and result is measured in one run, *interleaved* (round-robin, the order
rotated every round), under the same runtime and thread count, so machine noise (frequency scaling,
a neighbour process) hits both alike and their ratio is meaningful even when the absolute numbers
drift.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bench.report import format_table, percentile, write_json


@dataclass(frozen=True)
class Latency:
    """Milliseconds per ``session.run`` at one batch size."""

    batch: int
    p50_ms: float
    p99_ms: float
    runs: int


@dataclass
class ModelStats:
    path: str
    file_bytes: int                # size of the model file on disk
    weight_bytes: int              # bytes of all initializers (the weights, whatever their dtype)
    params: int                    # initializer elements (scales and zero points included)
    latency: list[Latency] = field(default_factory=list)      # batch 1 and max batch
    fidelity: dict[str, float] = field(default_factory=dict)  # accuracy | cosine, top1_agreement, mean_kl

    def at(self, batch: int) -> Latency | None:
        return next((lat for lat in self.latency if lat.batch == batch), None)


@dataclass
class CompressionReport:
    method: str
    recipe: dict
    source: ModelStats
    result: ModelStats
    machine: dict                   # cpu, cores, vnni, runtime versions, threads
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> CompressionReport:
        def stats(s: dict) -> ModelStats:
            return ModelStats(**{**s, "latency": [Latency(**lat) for lat in s.get("latency", [])]})
        return cls(**{**d, "source": stats(d["source"]), "result": stats(d["result"])})


# -- sizes ---------------------------------------------------------------------------------------


def onnx_weights(path: Path) -> tuple[int, int]:
    """(elements, bytes) over every initializer of an ONNX file, subgraphs included."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    elements = nbytes = 0

    def visit(graph) -> None:
        nonlocal elements, nbytes
        for init in graph.initializer:
            a = numpy_helper.to_array(init)
            elements += int(a.size)
            nbytes += int(a.nbytes)
        for node in graph.node:
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(g)

    visit(model.graph)
    return elements, nbytes


def count_onnx_params(path: Path) -> int:
    """Initializer elements of an ONNX file (for a quantized file, scales and zero points count too)."""
    return onnx_weights(path)[0]


def model_stats(path: Path) -> ModelStats:
    params, nbytes = onnx_weights(path)
    return ModelStats(path=str(path), file_bytes=Path(path).stat().st_size, weight_bytes=nbytes, params=params)


# -- latency -------------------------------------------------------------------------------------


def measure_latency(sessions: Mapping[str, object], make_inputs: Callable[[int], dict[str, np.ndarray]],
                    batches: Sequence[int] = (1, 64), repeats: int = 50, warmup: int = 3) -> dict[str, list[Latency]]:
    """Time ``session.run(None, feeds)`` for every session at every batch size, interleaved.

    For each batch size the same feeds go to every session; each round runs every session once, in
    an order rotated per round (so no session always runs right after another one's cache traffic).
    Returns name -> [Latency per batch size].
    """
    names = list(sessions)
    out: dict[str, list[Latency]] = {n: [] for n in names}
    for batch in batches:
        feeds = make_inputs(batch)
        for _ in range(warmup):
            for n in names:
                sessions[n].run(None, feeds)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                sessions[n].run(None, feeds)
                times[n].append((time.perf_counter() - t0) * 1e3)
        for n in names:
            out[n].append(Latency(batch, percentile(times[n], 50), percentile(times[n], 99), repeats))
    return out


# -- fidelity ------------------------------------------------------------------------------------


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of (N, C) logits against (N,) integer labels."""
    return float((np.asarray(logits).argmax(-1).reshape(-1) == np.asarray(labels).reshape(-1)).mean())


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity (rows = all leading axes); a zero row against a zero row is 1."""
    a, b = _rows(a), _rows(b)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return float(np.clip(cos, -1.0, 1.0).mean())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose argmax over the last axis is the same (classes, next tokens)."""
    return float((_rows(a).argmax(1) == _rows(b).argmax(1)).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(P || Q), P and Q the softmax of the logits (P = reference, in nats)."""
    lp, lq = _log_softmax(_rows(p_logits)), _log_softmax(_rows(q_logits))
    return float(max((np.exp(lp) * (lp - lq)).sum(axis=1).mean(), 0.0))


def compare_outputs(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Fidelity of ``other`` against ``reference`` without labels: cosine always; top-1 agreement
    and KL when the last axis can be a distribution (more than one entry)."""
    d = {"cosine": cosine(reference, other)}
    if np.asarray(reference).ndim >= 1 and np.asarray(reference).shape[-1] > 1:
        d["top1_agreement"] = top1_agreement(reference, other)
        d["mean_kl"] = mean_kl(reference, other)
    return d


def primary_fidelity(stats: ModelStats) -> tuple[str, float]:
    """The one fidelity figure to plot: task accuracy when measured, else cosine to the source."""
    for key in ("accuracy", "cosine"):
        if key in stats.fidelity:
            return key, stats.fidelity[key]
    return "fidelity", float("nan")


# -- machine -------------------------------------------------------------------------------------


def machine_info(threads: int, vnni: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime as ort

    return {"cpu": cpu, "cores": os.cpu_count(), "vnni": vnni, "threads": threads,
            "onnxruntime": ort.__version__, "python": platform.python_version()}


# -- output --------------------------------------------------------------------------------------


def write_report(report: CompressionReport, path: Path) -> None:
    write_json(path, dataclasses.asdict(report))


def read_report(path: Path) -> CompressionReport:
    return CompressionReport.from_dict(json.loads(Path(path).read_text()))


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 1 else f"{v:,.2f}"


_FIDELITY_CELLS = {"accuracy": lambda v: f"{100 * v:.2f}%", "top1_agreement": lambda v: f"{100 * v:.2f}%",
                   "cosine": lambda v: f"{v:.5f}", "mean_kl": lambda v: f"{v:.2e}"}


def _row(name: str, s: ModelStats, ref: ModelStats) -> dict:
    """One table row; cells are strings so small latencies and fidelity keep their digits."""
    row: dict = {"model": name, "size_KiB": s.file_bytes / 1024, "size_x": ref.file_bytes / s.file_bytes,
                 "params": s.params, "weights_KiB": s.weight_bytes / 1024}
    for lat in s.latency:
        r = ref.at(lat.batch)
        row[f"p50_b{lat.batch}_ms"] = _ms(lat.p50_ms)
        row[f"p99_b{lat.batch}_ms"] = _ms(lat.p99_ms)
        row[f"speed_b{lat.batch}_x"] = (r.p50_ms / lat.p50_ms) if r else float("nan")
    row.update({k: _FIDELITY_CELLS.get(k, str)(float(v)) for k, v in s.fidelity.items()})
    return row


def report_rows(reports: Sequence[CompressionReport]) -> list[dict]:
    """Table rows: the first report's source, then each report's result (ratios against that source)."""
    ref = reports[0].source
    rows = [_row("source", ref, ref)]
    rows += [_row(r.method, r.result, ref) for r in reports]
    return rows


def format_report(report: CompressionReport | Sequence[CompressionReport]) -> str:
    reports = [report] if isinstance(report, CompressionReport) else list(report)
    rows = report_rows(reports)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    text = format_table(rows, columns)
    notes = [n for r in reports for n in r.notes]
    m = reports[0].machine
    head = f"{m.get('cpu')} | {m.get('threads')} thread(s) | VNNI {'yes' if m.get('vnni') else 'no'} | onnxruntime {m.get('onnxruntime')}"
    return "\n".join([head, text] + [f"note: {n}" for n in dict.fromkeys(notes)])


def _label(path: str, method: str) -> str:
    parent = Path(path).parent.name
    return f"v{parent} {method}" if parent.isdigit() else f"{Path(path).name} {method}"


def version_points(reports: Sequence[CompressionReport]) -> list[tuple[str, ModelStats]]:
    """One (label, stats) per distinct model file over the reports: sources labelled 'fp32'/'source',
    results by their method; a file measured twice keeps its latest measurement."""
    points: dict[str, tuple[str, ModelStats]] = {}
    for r in reports:
        points[r.source.path] = (_label(r.source.path, "source"), r.source)
        points[r.result.path] = (_label(r.result.path, r.method), r.result)
    return list(points.values())


def plot_versions(reports: Sequence[CompressionReport], png: Path, title: str = "") -> Path:
    """Scatter of p50 latency (largest measured batch) against the primary fidelity (accuracy, else
    cosine to the source), one labelled point per model file of the reports (all versions of a
    model when given every version's report). Latencies from different reports were measured in
    different runs: compare them loosely. matplotlib is imported here only (optional dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = version_points(reports)
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "fidelity"
    for label, s in points:
        if not s.latency:
            continue
        lat = max(s.latency, key=lambda x: x.batch)
        metric, value = primary_fidelity(s)
        ax.scatter([lat.p50_ms], [value])
        ax.annotate(label, (lat.p50_ms, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    batch = max((x.batch for _, s in points for x in s.latency), default=1)
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
    ax.set_ylabel(metric)
    ax.set_title(title or "latency vs fidelity")
    ax.grid(alpha=0.3)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
