"""Convert an rtserve PyTorch spec model (``model.spec.json`` + ``model.safetensors``) to a ``.tflite``
file with Google's LiteRT PyTorch converter (PyPI ``litert-torch``).

Runs in its own virtual environment, not rtserve's (litert-torch pulls in jax, transformers,
ai-edge-quantizer ... about 2 GB; ``make litert`` creates ``.venv-litert``), as a script: ``rtserve
convert --to tflite --via litert`` calls it::

    .venv-litert/bin/python src/rtserve/export/litert_convert.py SPEC_DIR OUT.tflite [--batch N]

It imports rtserve's spec loader (torch + safetensors) from the source tree it lives in, not an
installed rtserve. Weights are read with safetensors, never unpickled.

The batch axis is FIXED (``--batch``, default 1): litert-torch 0.10.0 lowers conv/reshape through
its JAX bridge, which rejects symbolic dimensions (``dynamic_shapes`` fails with "Shapes must be 1D
sequences of concrete values"), and the sample batch is baked into the graph's reshapes, so a
LiteRT interpreter cannot resize the batch afterwards either.

The input/output tensors are renamed to the spec's ``input_name``/``output_name`` (litert-torch
calls them ``serving_default_<name>`` and ``serving_default_<name>_output``). On success one JSON
line goes to stdout: the tensors' names, shapes and dtypes and, unless ``--no-verify``, the max
absolute difference between LiteRT and PyTorch on random inputs. Errors: a message on stderr, exit 2.

Note: do not run this from a directory that holds a folder named ``triton``: Python then imports it
as an empty namespace package, torch believes Triton is installed, and ``import torch._dynamo``
fails with "module 'triton' has no attribute 'language'". The script drops such path entries.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

SPEC, WEIGHTS = "model.spec.json", "model.safetensors"


def _drop_fake_triton() -> None:
    """Remove sys.path entries that make a stray ``triton/`` folder importable as a namespace package."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin not in (None, "namespace"):
        return
    dirs = {str(Path(p).parent.resolve()) for p in (spec.submodule_search_locations or [])}
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) not in dirs]


def load(folder: Path):
    """The spec model, through rtserve's own loader (rtserve's ``src`` is put on the path: the
    loader needs only torch and safetensors, both in this environment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from rtserve.spec.model import load_spec_model

    sm = load_spec_model(folder)
    return sm.model.eval(), tuple(sm.input_shape), sm.input_name, sm.output_name


def rename_io(path: Path, input_name: str, output_name: str) -> None:
    """Give the graph's input/output tensors the spec's names (signature keys are already these)."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    fb = fu.read_model(str(path))
    sg = fb.subgraphs[0]
    sg.tensors[sg.inputs[0]].name = input_name.encode()
    sg.tensors[sg.outputs[0]].name = output_name.encode()
    fu.write_model(fb, str(path))


def describe_and_verify(path: Path, model, batch: int, shape: tuple, verify: bool) -> dict:
    import numpy as np
    import torch
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()

    def info(d):
        return {"name": d["name"], "shape": [int(x) for x in d["shape_signature"]], "dtype": np.dtype(d["dtype"]).name}

    ins, outs = it.get_input_details(), it.get_output_details()
    res = {"tflite": str(path), "bytes": path.stat().st_size, "batch": batch, "dynamic_batch": False,
           "inputs": [info(d) for d in ins], "outputs": [info(d) for d in outs]}
    if verify:
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        it.set_tensor(ins[0]["index"], x)
        it.invoke()
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        res["max_abs_diff"] = float(np.abs(it.get_tensor(outs[0]["index"]) - ref).max())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec_dir", type=Path, help="folder with model.spec.json and model.safetensors")
    ap.add_argument("out", type=Path, help="the .tflite file to write")
    ap.add_argument("--batch", type=int, default=1, help="fixed batch size baked into the file (default 1)")
    ap.add_argument("--no-verify", action="store_true", help="skip the LiteRT-vs-PyTorch check")
    ap.add_argument("--keep-names", action="store_true", help="keep litert-torch's serving_default_* tensor names")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be >= 1")

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")   # its progress log goes to stdout
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _drop_fake_triton()
    try:
        import torch
        from torch import nn

        model, shape, in_name, out_name = load(args.spec_dir)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        print(f"litert_convert: {e}", file=sys.stderr)
        return 2

    class Named(nn.Module):   # kwarg in, dict out: the signature then uses the spec's names
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return {out_name: self.m(kw[in_name])}

    import litert_torch

    try:
        edge = litert_torch.convert(Named(model).eval(), sample_kwargs={in_name: torch.zeros(args.batch, *shape)})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        edge.export(str(args.out))
        if not args.keep_names:
            rename_io(args.out, in_name, out_name)
        print(json.dumps(describe_and_verify(args.out, model, args.batch, shape, not args.no_verify)))
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        print(f"litert_convert: conversion failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
