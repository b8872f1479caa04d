"""Export a PyTorch module to a ``.pt2`` program or ONNX with a dynamic batch axis."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from ..backends.torch import META_FILE


def export_pt2(module, example, path: Path, input_names: list[str], output_names: list[str]) -> Path:
    """Save ``torch.export`` of ``module`` (batch axis dynamic) with tensor names as metadata."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    examples = example if isinstance(example, tuple) else (example,)
    ep = torch.export.export(module.eval(), examples, dynamic_shapes=tuple({0: batch} for _ in examples))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path), extra_files={META_FILE: json.dumps({"inputs": input_names, "outputs": output_names})})
    return path


def export_onnx(module, example, path: Path, input_names: list[str], output_names: list[str]) -> Path:
    """torch.export-based ONNX export with a dynamic batch axis on every input."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    examples = example if isinstance(example, tuple) else (example,)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), examples, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=tuple({0: batch} for _ in examples),
                          verbose=False, external_data=False)
    return path


def export_spec_onnx(sm, path: Path) -> Path:
    """A spec model (``spec.model.SpecModel``) as ONNX with its own tensor names."""
    return export_onnx(sm.model.eval(), sm.example(), path, [sm.input_name], [sm.output_name])
