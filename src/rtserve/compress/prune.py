"""Pruning. Structured pruning removes whole output channels of convolutions and neurons of linear
layers -- and the matching inputs of the layer that consumes them -- so the pruned model has smaller
matrices and really runs faster. Unstructured (magnitude) pruning zeroes individual weights: the
file compresses better but dense kernels run exactly as before, so it brings no speedup.

Structured pruning works on a chain of layers (``nn.Sequential``, as exported classifiers usually
are): Conv2d / Linear layers with elementwise activations, pooling, dropout, BatchNorm and Flatten
between them. Channels are ranked by the L2 norm of their filters (plus their bias); each prunable
layer keeps ``ceil((1 - ratio) * channels)``. The last Conv/Linear (the model's outputs) is never
pruned. A layer the planner does not understand is an error naming it, raised before any change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
                nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)


class PruneError(ValueError):
    """A model or ratio structured pruning cannot handle (raised before any change)."""


@dataclass(frozen=True)
class PrunedLayer:
    index: int
    kind: str
    before: int   # output channels / features
    after: int


def _check(model: nn.Module, ratio: float) -> list[int]:
    if not 0.0 < ratio < 1.0:
        raise PruneError(f"prune ratio must be in (0, 1), got {ratio}")
    if not isinstance(model, nn.Sequential):
        raise PruneError(f"structured pruning needs an nn.Sequential chain of layers, got {type(model).__name__}")
    weighted = []
    for i, m in enumerate(model):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise PruneError(f"layer {i} ({type(m).__name__} with groups={m.groups}) is not supported "
                                 "for structured pruning")
            weighted.append(i)
        elif not isinstance(m, (*PASS_THROUGH, nn.BatchNorm2d, nn.BatchNorm1d, nn.Flatten)):
            raise PruneError(f"layer {i} ({type(m).__name__}) is not supported for structured pruning")
    if len(weighted) < 2:
        raise PruneError("structured pruning needs at least two Conv2d/Linear layers (the last one is kept whole)")
    return weighted


def _keep(layer: nn.Module, ratio: float) -> torch.Tensor:
    w = layer.weight.detach()
    score = w.reshape(w.shape[0], -1).pow(2).sum(1)
    if layer.bias is not None:
        score = score + layer.bias.detach().pow(2)
    n = max(1, math.ceil((1.0 - ratio) * w.shape[0]))
    return score.topk(n).indices.sort().values


def _slice_out(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, len(keep), layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode)
    else:
        new = nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None)
    new.weight.data = layer.weight.data[keep].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data[keep].clone()
    return new


def _slice_in(layer: nn.Module, keep_in: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(len(keep_in), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode)
    else:
        new = nn.Linear(len(keep_in), layer.out_features, bias=layer.bias is not None)
    new.weight.data = layer.weight.data[:, keep_in].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data.clone()
    return new


def _slice_bn(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    if bn.affine:
        new.weight.data, new.bias.data = bn.weight.data[keep].clone(), bn.bias.data[keep].clone()
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
    return new


def structured_prune(model: nn.Sequential, ratio: float, example: torch.Tensor) -> tuple[nn.Sequential, list[PrunedLayer]]:
    """A new, smaller ``nn.Sequential``; ``example`` (one input batch) gives the spatial size a
    Flatten sees, so a Linear after it drops the right feature groups."""
    weighted = _check(model, ratio)
    layers = list(model)
    # feature size per channel at each Flatten: run the example through, recording shapes
    shapes = []
    x = example
    with torch.no_grad():
        for m in layers:
            shapes.append(tuple(x.shape))
            x = m(x)
    report = []
    for a, b in zip(weighted, weighted[1:]):
        producer = layers[a]
        keep = _keep(producer, ratio)
        report.append(PrunedLayer(a, type(producer).__name__, producer.weight.shape[0], len(keep)))
        layers[a] = _slice_out(producer, keep)
        keep_in = keep
        for j in range(a + 1, b):  # what lies between the producer and its consumer
            m = layers[j]
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                layers[j] = _slice_bn(m, keep)
            elif isinstance(m, nn.Flatten):
                shape = shapes[j]  # (N, C, H, W) entering the Flatten
                per = int(math.prod(shape[2:])) if len(shape) > 2 else 1
                keep_in = (keep[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
        layers[b] = _slice_in(layers[b], keep_in)
    return nn.Sequential(*layers), report


def magnitude_prune(model: nn.Module, ratio: float) -> float:
    """Zero the smallest ``ratio`` of the weights of every Conv/Linear layer (global threshold).
    Returns the fraction of weights now zero. No speedup: dense kernels still multiply the zeros."""
    if not 0.0 < ratio < 1.0:
        raise PruneError(f"prune ratio must be in (0, 1), got {ratio}")
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weights:
        raise PruneError("no Conv2d/Linear weights to prune")
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = int(ratio * flat.numel())
    threshold = flat.kthvalue(max(1, k)).values
    zero = total = 0
    with torch.no_grad():
        for w in weights:
            w[w.abs() <= threshold] = 0.0
            zero += int((w == 0).sum())
            total += w.numel()
    return zero / total
