"""Offline ONNX graph optimization: ONNX Runtime's transformer fusions (attention, LayerNorm,
GELU, skip connections) where the graph is a transformer, constant folding and node elimination
otherwise, and optional float16 weights for GPUs (inputs and outputs stay float32 so clients do not
change). The result is verified by ``convert`` against its source like any conversion."""
from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path

FUSED = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "FastGelu",
         "BiasGelu", "Gelu", "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization")


def optimize_onnx(src: Path, dst: Path, *, fp16: bool = False) -> dict:
    """Write the optimized model to ``dst`` (may equal ``src``); returns counts of fused op types."""
    import onnx
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # the optimizer prints shape-inference notes
        model = optimizer.optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=1,
                                         use_gpu=False, only_onnxruntime=False)
    if fp16:
        model.convert_float_to_float16(keep_io_types=True)
    ops = Counter(n.op_type for n in model.model.graph.node)
    onnx.save(model.model, str(dst))
    return {op: ops[op] for op in FUSED if ops[op]}
