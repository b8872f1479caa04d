"""``--to pt2``: a ``torch.export`` program with its tensor names as metadata (what the torch
backend serves), or a ``.pt2`` source copied."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runners import run_torch
from .base import ConversionOptions, ConversionTarget, LoadedSource, register_target


def save_program_pt2(module, examples: tuple, path: Path, names, outs, dynamic_shapes) -> None:
    import torch

    from ...backends.torch import META_FILE

    ep = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes)
    torch.export.save(ep, str(path), extra_files={META_FILE: json.dumps({"inputs": names, "outputs": outs})})


@register_target
class Pt2Target(ConversionTarget):
    name = "pt2"

    def write(self, source: LoadedSource, path: Path, options: ConversionOptions) -> None:
        if source.kind == "pt2":
            shutil.copyfile(source.path, path)
        else:
            save_program_pt2(source.module, source.example, path, source.input_names, source.output_names,
                             source.dynamic_shapes)

    def run(self, path, samples, names):
        import torch

        return run_torch(torch.export.load(str(path)).module(), samples, names)
