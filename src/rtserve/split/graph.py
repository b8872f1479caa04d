"""``rtserve split`` on a ``torch.export`` program (``.pt2``): cut its graph, not a layer list.

The program's graph is a list of operations in execution order. A cut between operation j-1 and
j hands over every value defined before j and used at or after j: the residual stream of a
transformer, an attention mask every layer reads, a second model output computed early. Any
number of tensors may cross a cut; each becomes a named input of the next stage that reads it.

Planning, on an example batch run through the graph once:
- cost of every operation by ``--balance``: ``params`` (weights it reads first), ``flops``
  (multiply-adds of matmuls, linears, convolutions and attention from the real shapes, element
  count otherwise) or ``latency`` (each operation timed on this machine);
- a cut is valid when every value crossing it is a tensor, or a symbolic size equal to one of the
  next stage's input dimensions (it is recomputed there with ``sym_size``);
- the stages minimise the most expensive stage (dynamic programming over operation prefix sums);
  among the cuts within ``TOLERANCE`` of that optimum, the ones handing over the fewest bytes win,
  so a transformer is cut between layers (one residual tensor) rather than inside one.

The operation costs are ``graph_costs.py``'s. :meth:`GraphSplitter.stage_module` builds a stage's
graph; ``graph_export.py`` re-exports every stage with ``torch.export`` with the source program's
symbolic dimensions (batch, sequence, ...) kept dynamic within their ranges, and writes it as
``.pt2`` or ONNX.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from .graph_costs import OpProfiler
from .planner import BALANCES, SplitError, partition

TOLERANCE = 0.05  # a cut may make the largest stage this much costlier if it hands over fewer bytes
EXAMPLE_BATCH = 4
EXAMPLE_DIM = 8   # symbolic non-batch dimensions in the example, clamped to their ranges


@dataclass(frozen=True)
class Crossing:
    """A tensor handed from one stage to a later one."""
    name: str
    dtype: str
    shape: tuple[str, ...]  # dims as text: numbers, or symbol names for dynamic ones
    bytes_per_sample: int


@dataclass(frozen=True)
class GraphStage:
    index: int
    ops: tuple[int, int]      # [start, end) into the graph's operations
    cost: float
    params: int
    modules: str              # the source modules its operations come from, first..last
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    crossing: tuple[Crossing, ...]  # what crosses the cut after this stage (empty for the last)


@dataclass(frozen=True)
class GraphPlan:
    balance: str
    n_ops: int
    stages: list[GraphStage]
    sizes: dict[str, int]      # the example's symbolic dimensions, which the bytes per sample assume

    @property
    def imbalance(self) -> float:
        costs = [s.cost for s in self.stages]
        return max(costs) / (sum(costs) / len(costs)) if sum(costs) else 1.0

    def table(self) -> str:
        total = sum(s.cost for s in self.stages) or 1.0
        lines = [f"{'stage':>5}  {'ops':>11}  {'cost':>11}  {'share':>6}  {'params':>10}  modules"]
        for s in self.stages:
            lines.append(f"{s.index:>5}  {s.ops[0]:>4}..{s.ops[1] - 1:<5}  {s.cost:>11.4g}  {s.cost / total:>6.1%}  "
                         f"{s.params:>10,}  {s.modules}")
            for c in s.crossing:
                lines.append(f"{'':>7}-> {c.name}: {c.dtype} [{', '.join(c.shape)}], {c.bytes_per_sample:,} B/sample")
        lines.append(f"balance by {self.balance} over {self.n_ops} operations: the largest stage is "
                     f"{self.imbalance:.2f}x the mean; bytes at {', '.join(f'{k}={v}' for k, v in self.sizes.items())}")
        return "\n".join(lines)


# -- the splitter -------------------------------------------------------------------------------------
def sym_expr(d):
    """The sympy expression of a symbolic size; None for a plain int."""
    return d.node.expr if isinstance(d, torch.SymInt) else None


def _bound(x, default):
    """A range bound as an int; an infinite one as ``default``."""
    try:
        return int(x)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _evaluate(expr, sizes: dict[str, int]) -> int:
    return int(expr.subs({sym: sizes[str(sym)] for sym in expr.free_symbols}))


class GraphSplitter:
    """Plans and writes the stages of one ``torch.export`` program."""

    def __init__(self, ep, input_names: list[str] | None = None, output_names: list[str] | None = None) -> None:
        # functional ATen (no in-place writes): a value handed to a later stage is then never
        # changed behind its back by a write through an alias in an earlier one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notices
            try:
                ep = ep.run_decompositions({})
            except Exception as e:  # noqa: BLE001 - torch raises many kinds (seen: derived input dims)
                raise SplitError(f"the program cannot be made functional for splitting ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
        self.gm = ep.module()
        graph = self.gm.graph
        odd = [n.target for n in graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
        if odd:
            raise SplitError(f"the program calls submodules ({', '.join(map(str, odd))}); export it without "
                             "preserved module calls")
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.ops = [n for n in graph.nodes if n.op == "call_function"]
        self.out_node = next(n for n in graph.nodes if n.op == "output")
        self.out_values = list(self.out_node.args[0]) if isinstance(self.out_node.args[0], (tuple, list)) \
            else [self.out_node.args[0]]
        self.input_names = list(input_names or [p.name for p in self.placeholders])
        self.output_names = list(output_names or [f"output_{i}" for i in range(len(self.out_values))])
        if len(self.input_names) != len(self.placeholders) or len(self.output_names) != len(self.out_values):
            raise SplitError("the program's inputs/outputs do not match the names in its metadata")
        if any(not isinstance(v, fx.Node) or v.op != "call_function" for v in self.out_values) \
                or len(set(self.out_values)) != len(self.out_values):
            raise SplitError("every model output must be a distinct computed tensor (not an input or a weight)")
        unused = [name for p, name in zip(self.placeholders, self.input_names)
                  if not any(u.op == "call_function" for u in p.users)]
        if unused:
            raise SplitError(f"input '{unused[0]}' is not used by the program; export the model without it")
        self.ranges = {str(k): (_bound(v.lower, 0), _bound(v.upper, None)) for k, v in ep.range_constraints.items()}
        self.batch_symbol = self._batch_symbol()
        self.pos = {n: i for i, n in enumerate(self.ops)}
        for p in self.placeholders:
            self.pos[p] = -1
        L = len(self.ops)
        self.last_use: dict[fx.Node, int] = {}
        for v in [*self.placeholders, *self.ops]:
            uses = [self.pos[u] for u in v.users if u.op == "call_function"]
            if v in self.out_values:
                uses.append(L)
            if uses:
                self.last_use[v] = max(uses)
        self.names: dict[fx.Node, str] = dict(zip(self.placeholders, self.input_names))
        self.names.update(zip(self.out_values, self.output_names))
        taken = set(self.names.values())
        for n in self.ops:
            if n not in self.names:
                self.names[n] = n.name if n.name not in taken else f"{n.name}_t"

    def _batch_symbol(self) -> str:
        syms = set()
        for p, name in zip(self.placeholders, self.input_names):
            val = p.meta.get("val")
            for d, size in enumerate(getattr(val, "shape", ())):
                if sym_expr(size) is not None and not sym_expr(size).is_Symbol:
                    raise SplitError(f"input '{name}' dimension {d} is derived ({sym_expr(size)}); splitting "
                                     "needs plain dynamic dimensions")
            if not isinstance(val, torch.Tensor) or val.dim() == 0 or sym_expr(val.shape[0]) is None:
                raise SplitError(f"input '{name}' has no dynamic batch axis (dimension 0); export the model with "
                                 "a dynamic batch dimension to split it")
            syms.add(str(sym_expr(val.shape[0])))
        if len(syms) != 1:
            raise SplitError(f"the inputs' batch axes are different symbols ({', '.join(sorted(syms))})")
        return syms.pop()

    # -- examples -----------------------------------------------------------------------------------
    def sizes(self, batch: int) -> dict[str, int]:
        out = {}
        for sym, (lo, hi) in self.ranges.items():
            want = batch if sym == self.batch_symbol else EXAMPLE_DIM
            out[sym] = max(lo, want if hi is None else min(want, hi))
        return out

    def example(self, batch: int = EXAMPLE_BATCH, seed: int = 0) -> list[torch.Tensor]:
        """Inputs of the program's shapes: floats random, integers (ids, masks) ones, booleans true."""
        sizes = self.sizes(batch)
        g = torch.Generator().manual_seed(seed)
        xs = []
        for p in self.placeholders:
            val = p.meta["val"]
            shape = [_evaluate(sym_expr(d), sizes) if sym_expr(d) is not None else int(d) for d in val.shape]
            if val.dtype.is_floating_point:
                xs.append(torch.randn(shape, generator=g).to(val.dtype))
            else:
                xs.append(torch.ones(shape, dtype=val.dtype))
        return xs

    # -- planning -----------------------------------------------------------------------------------
    def _crossing_at(self, j: int) -> list[fx.Node]:
        """Values defined before operation j and used at or after it (cut 0: the used inputs)."""
        return [v for v, last in self.last_use.items() if self.pos[v] < j <= last]

    def _passable(self, v: fx.Node) -> bool:
        val = v.meta.get("val")
        if isinstance(val, torch.Tensor):
            return all(sym_expr(d) is None or sym_expr(d).is_Symbol for d in val.shape)
        return isinstance(val, torch.SymInt) and sym_expr(val).is_Symbol

    def plan(self, n_stages: int, balance: str = "flops", repeats: int = 5) -> GraphPlan:
        if balance not in BALANCES:
            raise SplitError(f"--balance '{balance}' is not one of {', '.join(BALANCES)}")
        if n_stages < 2:
            raise SplitError(f"--stages {n_stages}: at least 2")
        L = len(self.ops)
        if n_stages > L:
            raise SplitError(f"--stages {n_stages}: the program has only {L} operations")
        prof = OpProfiler(self.gm, balance, repeats)
        with torch.no_grad():
            prof.run(*self.example())
        self.values = prof.values
        params_of = self._first_param_use()
        if balance == "params":
            costs = np.array([float(params_of[n]) for n in self.ops])
        else:
            costs = np.array([prof.costs.get(n, 0.0) for n in self.ops])
        cut_bytes, valid = self._cuts(prof.values)
        bounds = partition(costs, n_stages, valid, cut_bytes, TOLERANCE)
        stages = []
        for i, (a, b) in enumerate(bounds):
            ins, outs = self._stage_inputs(a, b), self._stage_outputs(a, b)
            crossing = tuple(self._describe(v) for v in self._crossing_at(b)
                             if isinstance(v.meta.get("val"), torch.Tensor)) if b < L else ()
            stages.append(GraphStage(i, (a, b), float(costs[a:b].sum()), int(sum(params_of[n] for n in self.ops[a:b])),
                                     self._modules(a, b), tuple(self.names[v] for v in ins),
                                     tuple(self.names[v] for v in outs), crossing))
        self._bounds = bounds
        return GraphPlan(balance, L, stages, self.sizes(EXAMPLE_BATCH))

    def _cuts(self, values) -> tuple[np.ndarray, np.ndarray]:
        """Bytes handed over at every cut, and whether it can be made: every value crossing it is a
        tensor with plain dimensions, or a size that some tensor crossing with it carries; and the
        operation just before it makes a tensor that crosses it (so no stage is left without an
        output, such as one holding only ``x.shape`` reads)."""
        L = len(self.ops)
        cut_bytes, bad = np.zeros(L + 1), np.zeros(L + 1, dtype=int)
        carriers: dict[str, np.ndarray] = {}
        sizes = []
        for v, last in self.last_use.items():
            lo, hi = self.pos[v] + 1, last  # v crosses cuts lo..hi
            if lo > hi:
                continue
            val = v.meta.get("val")
            if isinstance(val, torch.Tensor) and self._passable(v):
                real = values.get(v)
                cut_bytes[lo:hi + 1] += real.numel() * real.element_size() if isinstance(real, torch.Tensor) else 0
                for d in val.shape:
                    if sym_expr(d) is not None:
                        carriers.setdefault(str(sym_expr(d)), np.zeros(L + 1, dtype=int))[lo:hi + 1] += 1
            elif isinstance(val, torch.SymInt) and self._passable(v):
                sizes.append((str(sym_expr(val)), lo, hi))
            else:
                bad[lo:hi + 1] += 1
        for sym, lo, hi in sizes:  # a size no crossing tensor carries cannot be rebuilt after the cut
            carried = carriers.get(sym, np.zeros(L + 1, dtype=int))
            bad[lo:hi + 1] += carried[lo:hi + 1] == 0
        for j in range(1, L):
            prev = self.ops[j - 1]
            if not isinstance(prev.meta.get("val"), torch.Tensor) or self.last_use.get(prev, -1) < j:
                bad[j] += 1
        valid = bad == 0
        valid[0] = valid[L] = True
        return cut_bytes, valid

    def _first_param_use(self) -> dict[fx.Node, int]:
        seen, out = set(), {}
        for n in self.ops:
            k = 0
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a.target not in seen:
                    seen.add(a.target)
                    t = self.values.get(a)
                    k += t.numel() if isinstance(t, torch.Tensor) else 0
            out[n] = k
        return out

    def _stage_inputs(self, a: int, b: int) -> list[fx.Node]:
        """Tensors the stage reads from before it; sizes from before it are recomputed from a tensor
        input's shape, so a tensor that carries such a size is added when no read tensor does."""
        crossing = self._crossing_at(a)
        reads = lambda v: any(a <= self.pos.get(u, -2) < b for u in v.users)  # noqa: E731
        tensors = [v for v in crossing if isinstance(v.meta.get("val"), torch.Tensor)]
        need = [v for v in tensors if reads(v)]
        for v in crossing:
            val = v.meta.get("val")
            if isinstance(val, torch.SymInt) and reads(v) and not any(self._carries(t, val) for t in need):
                need.extend([t for t in tensors if self._carries(t, val)][:1])
        return need

    @staticmethod
    def _carries(t: fx.Node, size) -> bool:
        return any(sym_expr(d) == sym_expr(size) for d in t.meta["val"].shape)

    def _stage_outputs(self, a: int, b: int) -> list[fx.Node]:
        """Tensors the stage makes that a later stage reads or the model returns (in output order)."""
        made = [v for v in self._crossing_at(b) if a <= self.pos[v] < b and isinstance(v.meta.get("val"), torch.Tensor)]
        return sorted(made, key=lambda v: self.out_values.index(v) if v in self.out_values else -1)

    def _describe(self, v: fx.Node) -> Crossing:
        val, real = v.meta["val"], self.values[v]
        dims = tuple(str(sym_expr(d)) if sym_expr(d) is not None else str(int(d)) for d in val.shape)
        batch = real.shape[0] if real.dim() and str(sym_expr(val.shape[0])) == self.batch_symbol else 1
        return Crossing(self.names[v], str(val.dtype).removeprefix("torch."), dims,
                        real.numel() * real.element_size() // batch)

    def _modules(self, a: int, b: int) -> str:
        """The source modules of operations a..b-1, as layers: ``bert.encoder.layer.3``, ``head``."""
        paths = []
        for n in self.ops[a:b]:
            stack = [p for p, _ in (n.meta.get("nn_module_stack") or {}).values() if p and not p.startswith("_")]
            if not stack:
                continue
            parts = stack[-1].split(".")
            cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), min(2, len(parts)))
            short = ".".join(parts[:cut])
            if not paths or paths[-1] != short:
                paths.append(short)
        if not paths:
            return "-"
        return paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"

    # -- the stages' graphs -------------------------------------------------------------------------
    def stage_module(self, k: int) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
        """Stage k of the last plan as a graph of its own: its inputs as placeholders, sizes from
        earlier stages recomputed with ``sym_size`` from an input that carries them, weights shared
        with the source program. Returns the graph and its input and output nodes in the source."""
        a, b = self._bounds[k]
        ins, outs = self._stage_inputs(a, b), self._stage_outputs(a, b)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for v in ins:
            env[v] = g.placeholder(self.names[v])
            env[v].meta = dict(v.meta)

        def arg(x: fx.Node) -> fx.Node:
            if x in env:
                return env[x]
            if x.op == "get_attr":
                env[x] = g.get_attr(x.target)
                return env[x]
            val = x.meta.get("val")
            if isinstance(val, torch.SymInt):  # a size from an earlier stage: read it off an input here
                for v in ins:
                    for d, size in enumerate(v.meta["val"].shape):
                        if sym_expr(size) == sym_expr(val):
                            env[x] = g.call_function(torch.ops.aten.sym_size.int, (env[v], d))
                            return env[x]
            raise SplitError(f"operation '{x.name}' is needed by stage {k} but no input of the stage carries it")

        for n in self.ops[a:b]:
            for x in n.all_input_nodes:
                arg(x)
            env[n] = g.node_copy(n, arg)
        g.output(tuple(env[v] for v in outs))
        g.eliminate_dead_code()
        return fx.GraphModule(self.gm, g), ins, outs
