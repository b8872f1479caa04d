"""The cost of every operation of a ``torch.export`` graph, for ``graph.py``'s ``--balance``: the
graph is run once on real tensors by :class:`OpProfiler`, which keeps every node's output (the
values a cut would hand over, and the examples the stages are re-exported with) and, by balance,
its multiply-adds (:func:`op_flops`, from the real shapes) or its median time on this machine.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import fx

_MATMULS = {"aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.addmm.default",
            "aten.baddbmm.default"}


def op_flops(node: fx.Node, args: tuple, out) -> float:
    """Multiply-adds x 2 of a matmul, linear, convolution or attention from its real arguments; the
    output's element count for any other operation; 0 for one that makes no tensor."""
    t = str(node.target)
    if not isinstance(out, torch.Tensor):
        return 0.0
    if t == "aten.linear.default":
        return 2.0 * out.numel() * args[0].shape[-1]
    if t in _MATMULS:
        a = args[1] if t in ("aten.addmm.default", "aten.baddbmm.default") else args[0]
        return 2.0 * out.numel() * a.shape[-1]
    if t.startswith("aten.conv") or t.startswith("aten.convolution"):
        w = args[1]
        return 2.0 * out.numel() * (w[0].numel() if w.dim() > 1 else 1)
    if "scaled_dot_product" in t:
        q, k = args[0], args[1]
        return 4.0 * q.numel() * k.shape[-2]
    return float(out.numel())


class OpProfiler(fx.Interpreter):
    """Runs the graph once on real tensors, keeping every node's output (``values``) and, for the
    ``flops`` and ``latency`` balances, every operation's cost (``costs``; ``params`` is counted by
    the splitter from the weights)."""

    def __init__(self, gm: fx.GraphModule, balance: str, repeats: int) -> None:
        super().__init__(gm)
        self.balance, self.repeats = balance, repeats
        self.values: dict[fx.Node, object] = {}
        self.costs: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n] = out
        if n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if self.balance == "latency":
                times = []
                for _ in range(self.repeats):
                    t0 = time.perf_counter()
                    n.target(*args, **kwargs)
                    times.append(time.perf_counter() - t0)
                self.costs[n] = float(np.median(times))
            elif self.balance == "flops":
                self.costs[n] = op_flops(n, args, out)
        return out
