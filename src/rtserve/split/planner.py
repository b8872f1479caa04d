"""``rtserve split``: cut a chain of layers (a PyTorch spec model: ``nn.Sequential``) into N
consecutive stages of balanced cost, and write them as a servable pipeline.

Cost per layer, by ``--balance``: ``params`` (weights), ``flops`` (multiply-adds of one sample,
counted from the shapes a forward pass sees), or ``latency`` (each layer timed on this machine at
the example batch). The cut minimises the most expensive stage (exact dynamic programming over the
layer prefix sums; a chain has few layers). For every cut the planner reports the tensor that
crosses it: its shape and bytes per sample, which is what the stages hand each other.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

BALANCES = ("params", "flops", "latency")


class SplitError(ValueError):
    """A request the planner cannot honour (raised before anything is written)."""


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: tuple[int, int]        # [start, end) indices into the chain
    cost: float
    params: int
    output_shape: tuple[int, ...]  # per sample, the tensor handed to the next stage
    output_bytes: int              # per sample


@dataclass(frozen=True)
class SplitPlan:
    balance: str
    layer_costs: list[float]
    stages: list[StagePlan]

    @property
    def imbalance(self) -> float:
        costs = [s.cost for s in self.stages]
        return max(costs) / (sum(costs) / len(costs)) if sum(costs) else 1.0

    def table(self) -> str:
        lines = [f"{'stage':>5}  {'layers':>9}  {'cost':>12}  {'share':>6}  {'params':>9}  crosses to the next stage"]
        total = sum(s.cost for s in self.stages) or 1.0
        for s in self.stages:
            cross = (f"{list(s.output_shape)} float32, {s.output_bytes:,} B/sample" if s.index < len(self.stages) - 1
                     else "(model output)")
            lines.append(f"{s.index:>5}  {s.layers[0]:>3}..{s.layers[1] - 1:<4}  {s.cost:>12.4g}  {s.cost / total:>6.1%}  "
                         f"{s.params:>9,}  {cross}")
        lines.append(f"balance by {self.balance}: the largest stage is {self.imbalance:.2f}x the mean")
        return "\n".join(lines)


def layer_costs(model: nn.Sequential, example: torch.Tensor, balance: str, repeats: int = 30) -> tuple[list[float], list]:
    """Cost of every layer and the (per-sample) output shape of every layer."""
    if balance not in BALANCES:
        raise SplitError(f"--balance '{balance}' is not one of {', '.join(BALANCES)}")
    costs, shapes = [], []
    x = example
    with torch.inference_mode():
        for m in model:
            y = m(x)
            if balance == "params":
                c = float(sum(p.numel() for p in m.parameters()))
            elif balance == "flops":
                if isinstance(m, nn.Conv2d):
                    k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                    c = float(2 * k * y[0].numel())
                elif isinstance(m, nn.Linear):
                    c = float(2 * m.in_features * m.out_features)
                else:
                    c = float(y[0].numel())  # elementwise work
            else:
                for _ in range(3):
                    m(x)
                t = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    m(x)
                    t.append(time.perf_counter() - t0)
                c = float(np.median(t))
            costs.append(c)
            shapes.append(tuple(y.shape[1:]))
            x = y
    return costs, shapes


def partition(costs, n: int, valid=None, cut_bytes=None, tolerance: float = 0.0) -> list[tuple[int, int]]:
    """n contiguous non-empty ranges of ``costs``, cut only where ``valid`` (cut j: between items
    j-1 and j): first the smallest achievable largest-range sum, then, among the partitions within
    ``tolerance`` of it, the one handing over the fewest ``cut_bytes`` (dynamic programming over
    prefix sums, vectorised over the previous cut)."""
    costs = np.asarray(costs, dtype=float)
    L = len(costs)
    valid = np.ones(L + 1, dtype=bool) if valid is None else valid
    cut_bytes = np.zeros(L + 1) if cut_bytes is None else cut_bytes
    pre = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    cand = [int(j) for j in np.flatnonzero(valid[1:L]) + 1]  # interior cut positions

    def ends(k: int) -> list[int]:
        return cand if k < n else [L]

    # pass 1: the smallest achievable largest stage
    best = np.full(L + 1, inf)
    best[0] = 0.0
    for k in range(1, n + 1):
        nxt = np.full(L + 1, inf)
        for j in ends(k):
            nxt[j] = np.min(np.maximum(best[:j], pre[j] - pre[:j]))
        best = nxt
    if not np.isfinite(best[L]):
        raise SplitError(f"the graph has too few places where it can be cut into {n} stages")
    cap = best[L] * (1 + tolerance) + 1e-12
    # pass 2: the fewest bytes handed over among the cuts that keep every stage under the cap
    dp = np.full((n + 1, L + 1), inf)
    back = np.zeros((n + 1, L + 1), dtype=int)
    dp[0, 0] = 0.0
    for k in range(1, n + 1):
        for j in ends(k):
            row = np.where(pre[j] - pre[:j] <= cap, dp[k - 1, :j], inf)
            i = int(np.argmin(row))
            dp[k, j], back[k, j] = row[i] + (cut_bytes[j] if j < L else 0.0), i
    bounds, j = [], L
    for k in range(n, 0, -1):
        i = int(back[k, j])
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def plan_split(model: nn.Sequential, example: torch.Tensor, n_stages: int, balance: str = "flops") -> SplitPlan:
    if not isinstance(model, nn.Sequential):
        raise SplitError(f"splitting needs a chain of layers (nn.Sequential), got {type(model).__name__}")
    if n_stages < 2:
        raise SplitError(f"--stages {n_stages}: at least 2")
    if n_stages > len(model):
        raise SplitError(f"--stages {n_stages}: the model has only {len(model)} layers")
    costs, shapes = layer_costs(model, example, balance)
    stages = []
    for i, (a, b) in enumerate(partition(costs, n_stages)):
        params = sum(p.numel() for m in list(model)[a:b] for p in m.parameters())
        shape = shapes[b - 1]
        stages.append(StagePlan(i, (a, b), float(sum(costs[a:b])), params, shape, int(np.prod(shape)) * 4))
    return SplitPlan(balance, costs, stages)


def write_pipeline(model: nn.Sequential, example: torch.Tensor, plan: SplitPlan, out: Path, input_name: str,
                   output_name: str, executor: str = "process", max_batch_size: int = 64,
                   micro_batch: int = 8, fmt: str = "onnx") -> Path:
    """DST becomes a repository model: ``model.yaml`` (backend pipeline) and ``1/`` with one model
    file per stage (``fmt``: onnx or pt2) and ``pipeline.json`` naming each stage's file, tensors,
    executor and device."""
    from ..export.torch_export import export_onnx, export_pt2

    if fmt not in ("onnx", "pt2"):
        raise SplitError(f"--format '{fmt}' is not one of onnx, pt2")
    export = export_onnx if fmt == "onnx" else export_pt2

    vdir = out / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    layers = list(model)
    stages, x = [], example
    for s in plan.stages:
        part = nn.Sequential(*layers[s.layers[0]:s.layers[1]]).eval()
        ins = input_name if s.index == 0 else f"cut{s.index - 1}"
        outs = output_name if s.index == len(plan.stages) - 1 else f"cut{s.index}"
        export(part, x, vdir / f"stage{s.index}.{fmt}", [ins], [outs])
        with torch.no_grad():  # not inference_mode: x is the next stage's example for torch.export
            x = part(x)
        stages.append({"file": f"stage{s.index}.{fmt}", "input": ins, "output": outs, "executor": executor,
                       "device": "cpu", "threads": 1, "layers": list(s.layers), "cost": s.cost})
    (vdir / "pipeline.json").write_text(json.dumps({"micro_batch": micro_batch, "stages": stages,
                                                    "plan": {"balance": plan.balance,
                                                             "stages": [asdict(s) for s in plan.stages]}}, indent=2))
    (out / "model.yaml").write_text(f"backend: pipeline\nmax_batch_size: {max_batch_size}\n"
                                    "batching:\n  max_queue_delay_ms: 2\n")
    return out
