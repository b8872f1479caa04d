"""``rtserve split SRC --stages N [--balance params|flops|latency] --out DST``."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .planner import BALANCES, SplitError, plan_split, write_pipeline


def add_split_parser(sub) -> None:
    p = sub.add_parser("split", help="cut a PyTorch model into balanced stages served as one pipeline")
    p.add_argument("src", help="a torch.export program (.pt2, or a folder with model.pt2): its graph is cut; or a "
                   "PyTorch spec model folder (model.spec.json + model.safetensors): cut between layers")
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--balance", default="flops", choices=BALANCES)
    p.add_argument("--out", required=True, help="the repository model folder to write (must not exist)")
    p.add_argument("--executor", default="process", choices=("process", "local", "ray"),
                   help="where each stage runs (edit 1/pipeline.json for per-stage executors and devices)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--devices", default=None,
                   help="each stage's device, comma-separated (cpu, cuda:0, cuda:1, ...; one value for all); "
                        "set after verification, which runs on the CPU")
    p.add_argument("--stage-options", default=None,
                   help="JSON options for every stage's backend, e.g. '{\"memory_fraction\": 0.3}' (a CUDA worker's "
                        "share of its GPU); set after verification, like --devices")
    p.add_argument("--in-flight", type=int, default=None,
                   help="batches in the pipeline at once (default: one per stage; more suits compute-bound stages)")
    p.add_argument("--format", default="onnx", choices=("onnx", "pt2"), help="each stage's model file")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.set_defaults(func=cmd_split)


@dataclass
class _Source:
    """What the command needs of either kind of source: the plan, a writer, and a reference."""
    table: str
    n_stages: int
    write: Callable[[Path], None]
    inputs: dict[str, np.ndarray]   # 19 samples to verify the written stages on
    reference: dict[str, np.ndarray]


def _is_program(src: Path) -> bool:
    return src.suffix == ".pt2" or (src.is_dir() and (src / "model.pt2").is_file())


def _program_source(src: Path, args) -> _Source:
    """A ``torch.export`` program: its graph is cut (any number of tensors per cut)."""
    import torch

    from ..export.convert import pt2_meta
    from .graph import GraphSplitter
    from .graph_export import write_stages

    path = src / "model.pt2" if src.is_dir() else src
    if not path.is_file():
        raise SplitError(f"{path} does not exist")
    try:
        ep, ins, outs = pt2_meta(path)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's file
        raise SplitError(f"{path}: torch.export.load cannot load it: {e}") from None
    splitter = GraphSplitter(ep, ins, outs)
    plan = splitter.plan(args.stages, args.balance)
    example = splitter.example(batch=19, seed=1)
    with torch.no_grad():
        want = splitter.gm(*example)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return _Source(plan.table(), len(plan.stages),
                   lambda dst: write_stages(splitter, plan, dst, args.format, args.executor, args.max_batch_size,
                                            args.micro_batch),
                   {n: t.numpy() for n, t in zip(splitter.input_names, example)},
                   {n: t.numpy() for n, t in zip(splitter.output_names, want)})


def _chain_source(src: Path, args) -> _Source:
    """A PyTorch spec model (``nn.Sequential``): cut between layers, one tensor per cut."""
    import torch

    from ..spec.model import load_spec_model

    try:
        sm = load_spec_model(src)
    except ValueError as e:
        raise SplitError(str(e)) from None
    plan = plan_split(sm.model, sm.example(8), args.stages, args.balance)
    x = np.random.default_rng(0).random((19, *sm.input_shape), dtype=np.float32)
    with torch.inference_mode():
        want = sm.model(torch.from_numpy(x)).numpy()
    return _Source(plan.table(), len(plan.stages),
                   lambda dst: write_pipeline(sm.model, sm.example(2), plan, dst, sm.input_name, sm.output_name,
                                              args.executor, args.max_batch_size, args.micro_batch, args.format),
                   {sm.input_name: x}, {sm.output_name: want})


def _devices(text: str | None, n: int) -> list[str] | None:
    if not text:
        return None
    devs = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in devs if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit())]
    if bad:
        raise SplitError(f"--devices: '{bad[0]}' is not cpu or cuda:N")
    if len(devs) == 1:
        return devs * n
    if len(devs) != n:
        raise SplitError(f"--devices names {len(devs)} devices for {n} stages (give one, or one per stage)")
    return devs


def _stage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        opts = json.loads(text)
    except ValueError as e:
        raise SplitError(f"--stage-options is not JSON: {e}") from None
    if not isinstance(opts, dict):
        raise SplitError("--stage-options must be a JSON object")
    return opts


def _amend(model_dir: Path, change: Callable[[dict], object]) -> None:
    """Apply ``change`` to the written pipeline description."""
    desc = model_dir / "1" / "pipeline.json"
    spec = json.loads(desc.read_text())
    change(spec)
    desc.write_text(json.dumps(spec, indent=2))


def cmd_split(args) -> int:
    from .serve import PipelineBackend
    from ..errors import ConfigError

    out = Path(args.out)
    src = Path(args.src)
    try:
        if out.exists():
            raise SplitError(f"--out {out} exists")
        devices = _devices(args.devices, args.stages)
        stage_options = _stage_options(args.stage_options)
        if args.in_flight is not None and args.in_flight < 1:
            raise SplitError("--in-flight must be >= 1")
        if args.micro_batch < 1 or args.max_batch_size < 1:
            raise SplitError("--micro-batch and --max-batch-size must be >= 1")
        source = _program_source(src, args) if _is_program(src) else _chain_source(src, args)
    except SplitError as e:
        print(f"rtserve split: {e}", file=sys.stderr)
        return 2
    print(source.table)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staged = Path(tmp) / out.name
        try:
            source.write(staged)
        except SplitError as e:
            print(f"rtserve split: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - torch.export / the ONNX exporter raise many kinds
            print(f"rtserve split: exporting the stages failed: {type(e).__name__}: {str(e).splitlines()[0]}; "
                  "nothing written", file=sys.stderr)
            return 2
        if args.in_flight is not None:
            _amend(staged, lambda spec: spec.update(in_flight=args.in_flight))
        # verified like a conversion: the stages, chained, compute what the whole model does
        try:
            pipe = PipelineBackend(staged / "1" / "pipeline.json", "cpu", {}, 1)
        except ConfigError as e:
            print(f"rtserve split: the written stages do not load: {e}; nothing written", file=sys.stderr)
            return 1
        try:
            got = pipe.run(source.inputs)
        finally:
            pipe.close()
        diff = 0.0
        for name, want in source.reference.items():
            scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
            diff = max(diff, float(np.abs(got[name].astype(np.float64) - want).max()) / scale if want.size else 0.0)
        if diff > 1e-4:
            print(f"rtserve split: the stages differ from the whole model by {diff:.3g} (relative); nothing written",
                  file=sys.stderr)
            return 1
        if devices:
            _amend(staged, lambda spec: [st.update(device=d) for st, d in zip(spec["stages"], devices)])
        if stage_options:
            _amend(staged, lambda spec: [st.update(options=stage_options) for st in spec["stages"]])
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    print(f"verified: chained stages match the whole model (max relative |difference| {diff:.2g}, 19 samples in "
          f"micro-batches of {args.micro_batch})\nwrote {out} ({source.n_stages} stages, executor {args.executor}"
          + (f", devices {', '.join(devices)})" if devices else ")"))
    return 0
