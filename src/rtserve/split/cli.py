"""``rtserve split SRC --stages N [--balance params|flops|latency] --out DST``."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .planner import BALANCES, SplitError, plan_split, write_pipeline


def add_split_parser(sub) -> None:
    p = sub.add_parser("split", help="cut a layer-chain model into balanced stages served as one pipeline")
    p.add_argument("src", help="a PyTorch spec model folder (model.spec.json + model.safetensors)")
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--balance", default="flops", choices=BALANCES)
    p.add_argument("--out", required=True, help="the repository model folder to write (must not exist)")
    p.add_argument("--executor", default="process", choices=("process", "local", "ray"),
                   help="where each stage runs (edit 1/pipeline.json for per-stage executors and devices)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--format", default="onnx", choices=("onnx", "pt2"), help="each stage's model file")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.set_defaults(func=cmd_split)


def cmd_split(args) -> int:
    import torch

    from ..backends.pipeline import PipelineBackend
    from ..compress.torch_model import load_spec_model

    out = Path(args.out)
    try:
        if out.exists():
            raise SplitError(f"--out {out} exists")
        try:
            sm = load_spec_model(Path(args.src))
        except ValueError as e:
            raise SplitError(str(e)) from None
        plan = plan_split(sm.model, sm.example(8), args.stages, args.balance)
    except SplitError as e:
        print(f"rtserve split: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staged = Path(tmp) / out.name
        write_pipeline(sm.model, sm.example(2), plan, staged, sm.input_name, sm.output_name, args.executor,
                       args.max_batch_size, args.micro_batch, args.format)
        # verified like a conversion: the stages, chained, compute what the whole model does
        pipe = PipelineBackend(staged / "1" / "pipeline.json", "cpu", {}, 1)
        try:
            x = np.random.default_rng(0).random((19, *sm.input_shape), dtype=np.float32)
            got = pipe.run({sm.input_name: x})[sm.output_name]
        finally:
            pipe.close()
        with torch.inference_mode():
            want = sm.model(torch.from_numpy(x)).numpy()
        diff = float(np.abs(got - want).max())
        if diff > 1e-4:
            print(f"rtserve split: the stages differ from the whole model by {diff:.3g}; nothing written", file=sys.stderr)
            return 1
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    print(f"verified: chained stages match the whole model (max |difference| {diff:.2g}, 19 samples in micro-batches "
          f"of {args.micro_batch})\nwrote {out} ({len(plan.stages)} stages, executor {args.executor})")
    return 0
