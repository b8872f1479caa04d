"""Writing a planned split of a ``torch.export`` program (``graph.py``) as a repository model.

Every stage's graph (:meth:`GraphSplitter.stage_module`) is re-exported with ``torch.export`` on
example values from one run of the whole program, with the source program's symbolic dimensions
(batch, sequence, ...) kept dynamic within their ranges; the batch is allowed down to 1, since
micro-batches and remainders may be smaller than the source's minimum. Each stage is written as
``.pt2`` (its input/output names in the ``META_FILE`` extra file) or ONNX, and ``pipeline.json``
chains them for ``backends/pipeline.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import fx

from .graph import EXAMPLE_BATCH, GraphPlan, GraphSplitter, sym_expr
from .graph_costs import OpProfiler
from .planner import SplitError


def export_stage(splitter: GraphSplitter, k: int, example_values: dict[fx.Node, torch.Tensor]):
    """``torch.export`` of stage k with the source's symbolic dimensions dynamic; returns the
    program, its example arguments and its input and output names."""
    gm, ins, outs = splitter.stage_module(k)
    dims: dict[str, torch.export.Dim] = {}

    def dim(sym: str):
        if sym not in dims:
            lo, hi = splitter.ranges.get(sym, (1, None))
            if sym == splitter.batch_symbol:  # micro-batches and remainders may be smaller than the source's minimum
                lo = 1
            dims[sym] = torch.export.Dim(sym, min=lo, max=hi)
        return dims[sym]

    dynamic = tuple({d: dim(str(sym_expr(s))) for d, s in enumerate(v.meta["val"].shape)
                     if sym_expr(s) is not None} for v in ins)
    args = tuple(example_values[v] for v in ins)
    ep = torch.export.export(gm, args, dynamic_shapes=dynamic)
    return ep, args, [splitter.names[v] for v in ins], [splitter.names[v] for v in outs]


def write_stages(splitter: GraphSplitter, plan: GraphPlan, out: Path, fmt: str = "pt2", executor: str = "process",
                 max_batch_size: int = 64, micro_batch: int = 8) -> Path:
    """``out`` becomes a repository model (``backend: pipeline``) with one file per stage of
    ``plan`` (the splitter's last plan)."""
    from ..backends.torch import META_FILE
    from ..export.convert import export_program_onnx

    if fmt not in ("onnx", "pt2"):
        raise SplitError(f"--format '{fmt}' is not one of onnx, pt2")
    vdir = out / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # the example values every stage is exported with
        prof = OpProfiler(splitter.gm, "params", 1)
        prof.run(*splitter.example(batch=max(2, EXAMPLE_BATCH)))
    entries = []
    for s in plan.stages:
        ep, args, in_names, out_names = export_stage(splitter, s.index, prof.values)
        path = vdir / f"stage{s.index}.{fmt}"
        if fmt == "pt2":
            torch.export.save(ep, str(path), extra_files={META_FILE: json.dumps({"inputs": in_names,
                                                                                 "outputs": out_names})})
        else:
            export_program_onnx(ep, args, path, in_names, out_names, None)
        entries.append({"file": path.name, "inputs": in_names, "outputs": out_names, "executor": executor,
                        "device": "cpu", "threads": 1, "ops": list(s.ops), "modules": s.modules,
                        "cost": s.cost})
    (vdir / "pipeline.json").write_text(json.dumps({
        "micro_batch": micro_batch, "inputs": splitter.input_names, "outputs": splitter.output_names,
        "stages": entries, "plan": {"balance": plan.balance, "n_ops": plan.n_ops}}, indent=2))
    (out / "model.yaml").write_text(f"backend: pipeline\nmax_batch_size: {max_batch_size}\n"
                                    "batching:\n  max_queue_delay_ms: 2\n")
    return out
