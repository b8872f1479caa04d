"""``rtserve convert SRC --to onnx|pt2|tflite --out DST [--optimize] [--fp16]``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .convert import TARGETS, ConversionError, convert
from .targets import vias


def add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert a model (HF encoder folder, .pt2, .onnx) to ONNX or .pt2, verified")
    c.add_argument("src", help="a Hugging Face encoder folder, a .pt2 program or an .onnx model")
    c.add_argument("--to", required=True, choices=tuple(TARGETS), help="tflite: from a PyTorch spec model folder")
    c.add_argument("--out", required=True, help="output file, or a repository model folder (a new version)")
    c.add_argument("--optimize", action="store_true", help="ONNX Runtime offline optimization and fusions")
    c.add_argument("--fp16", action="store_true", help="float16 weights (for GPUs), float32 inputs/outputs")
    c.add_argument("--via", default="rtserve", choices=vias(),
                   help="tflite writer: rtserve's own (dynamic batch) or Google's litert-torch (`make litert`; "
                        "the batch is fixed in the file)")
    c.add_argument("--batch", type=int, default=1, help="--via litert: the batch size fixed in the file")
    c.add_argument("--atol", type=float, help="verification tolerance (default 1e-4, 2e-2 with --fp16)")
    c.set_defaults(func=cmd_convert)


def output_path(out: Path, target: str) -> Path:
    """A repository model folder (it has model.yaml) gets a new version folder; a folder gets
    model.<target>; anything else is the file path itself."""
    name = f"model.{target}"
    if (out / "model.yaml").is_file():
        versions = [int(p.name) for p in out.iterdir() if p.is_dir() and p.name.isdigit()]
        return out / str(max(versions, default=0) + 1) / name
    if out.is_dir():
        return out / name
    return out


def cmd_convert(args) -> int:
    try:
        out = output_path(Path(args.out), args.to)
        result = convert(Path(args.src), args.to, out, optimize=args.optimize, fp16=args.fp16, atol=args.atol,
                         via=args.via, batch=args.batch)
    except ConversionError as e:
        print(f"rtserve convert: {e}", file=sys.stderr)
        return 2
    v = result.verification
    print(f"{result.source} ({result.source_kind}) -> {result.output} [{result.target}] in {result.seconds:.1f} s\n"
          f"verified on {v.samples} input sets: max |difference| {v.max_abs_diff:.3g} (tolerance {v.atol:g}), "
          f"mean cosine {v.mean_cosine:.6f}\ninputs {result.input_names}, outputs {result.output_names}")
    Path(result.output).with_name("conversion.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0
