"""Write a small float32 PyTorch module as a ``.tflite`` flatbuffer, without TensorFlow.

This is a deliberately tiny converter for test fixtures and simple models, not a general one.
The module is traced with ``torch.fx``; the traced graph must be a plain chain of submodule calls
(an ``nn.Sequential``, nested ones included, or a module whose ``forward`` calls its layers one
after the other). Supported layers and what they become:

* ``nn.Linear``                 -> FULLY_CONNECTED (on the last dimension; rank > 2 keeps dims)
* ``nn.ReLU``                   -> RELU
* ``nn.Softmax(dim=-1)``        -> SOFTMAX (beta 1)
* ``nn.Flatten()`` (start 1)    -> RESHAPE to ``[-1, n]``, flattening in torch's NCHW order
* ``nn.Conv2d`` (groups=1, zero padding, any stride/dilation) -> CONV_2D, with ``padding=SAME``
  when that reproduces torch's padding for the example's height/width, else PAD + ``VALID``
* ``nn.MaxPool2d`` (dilation 1) -> MAX_POOL_2D, when SAME or VALID reproduces torch's windows
* ``nn.Identity``, ``nn.Dropout`` -> nothing (inference semantics)

Anything else raises ``ValueError`` naming the layer. Tensors are float32 (parameters are cast).
Torch is NCHW and TFLite's CONV_2D/MAX_POOL_2D are NHWC: a TRANSPOSE is inserted when the data
enters a run of conv/pool layers and another when it leaves (before Flatten, Linear, Softmax or
the output), so the file's input and output have exactly the torch module's shapes. Dimension 0
is the batch: every activation tensor has ``shape_signature[0] == -1`` (dynamic batch) and
``shape[0] == 1``. Spatial sizes are fixed by ``example_input``.

The flatbuffer is built by hand with the ``flatbuffers`` package, using the field slot numbers of
TFLite's ``schema.fbs`` (model version 3, file identifier ``TFL3``).
"""
from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
import torch
from torch import nn

__all__ = ["write_tflite"]

# schema.fbs enums
_FLOAT32, _INT32 = 0, 2
_SAME, _VALID = 0, 1
_OP = {"CONV_2D": 3, "FULLY_CONNECTED": 9, "MAX_POOL_2D": 17, "RELU": 19, "RESHAPE": 22,
       "SOFTMAX": 25, "PAD": 34, "TRANSPOSE": 39}
_OPTS = {"Conv2DOptions": 1, "Pool2DOptions": 5, "FullyConnectedOptions": 8, "SoftmaxOptions": 9}
_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
_SUPPORTED = "Linear, ReLU, Softmax(dim=-1), Flatten, Conv2d, MaxPool2d, Identity, Dropout"
_LAYERS = (nn.Linear, nn.ReLU, nn.Softmax, nn.Flatten, nn.Conv2d, nn.MaxPool2d, nn.Identity, nn.Dropout)


class _Graph:
    def __init__(self) -> None:
        self.tensors: list[dict] = []
        self.buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel
        self.opcodes: list[int] = []
        self.ops: list[tuple] = []

    def tensor(self, name: str, shape, dtype: int = _FLOAT32, data: np.ndarray | None = None) -> int:
        buf = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data).astype("<f4" if dtype == _FLOAT32 else "<i4").tobytes())
            buf = len(self.buffers) - 1
        dyn = data is None  # activations batch-dynamic; constants static
        self.tensors.append({"name": name, "shape": [1, *shape[1:]] if dyn else list(shape),
                             "sig": [-1, *shape[1:]] if dyn else None, "type": dtype, "buffer": buf})
        return len(self.tensors) - 1

    def const(self, name: str, arr, dtype: int = _FLOAT32) -> int:
        arr = np.asarray(arr)
        return self.tensor(name, arr.shape, dtype, arr)

    def op(self, code: str, inputs, outputs, opts: str | None = None, fields=()) -> None:
        if _OP[code] not in self.opcodes:
            self.opcodes.append(_OP[code])
        self.ops.append((self.opcodes.index(_OP[code]), list(inputs), list(outputs), opts, list(fields)))


# --- flatbuffer helpers: a table is a list of (slot, kind, value), kind as in Builder.Prepend<kind>Slot
def _table(b: flatbuffers.Builder, fields) -> int:
    b.StartObject(max((s for s, _, _ in fields), default=-1) + 1)
    for slot, kind, value in fields:
        getattr(b, f"Prepend{kind}Slot")(slot, value, None)  # default None: always written
    return b.EndObject()


def _offsets(b: flatbuffers.Builder, offs) -> int:
    b.StartVector(4, len(offs), 4)
    for o in reversed(offs):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _ints(b: flatbuffers.Builder, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype="<i4"))


def _bytes16(b: flatbuffers.Builder, data: bytes) -> int:
    b.StartVector(1, len(data), 16)  # tensor data 16-byte aligned
    b.head -= len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    return b.EndVector()


def _serialize(g: _Graph, in_t: int, out_t: int, input_name: str, output_name: str) -> bytes:
    b = flatbuffers.Builder(1024 + sum(len(d) for d in g.buffers))
    buffers = [_table(b, [(0, "UOffsetTRelative", _bytes16(b, d))] if d else []) for d in g.buffers]
    tensors = []
    for t in g.tensors:
        fields = [(0, "UOffsetTRelative", _ints(b, t["shape"])), (1, "Int8", t["type"]),
                  (2, "Uint32", t["buffer"]), (3, "UOffsetTRelative", b.CreateString(t["name"]))]
        if t["sig"] is not None:
            fields.append((7, "UOffsetTRelative", _ints(b, t["sig"])))
        tensors.append(_table(b, fields))
    ops = []
    for opcode_index, ins, outs, opts, ofields in g.ops:
        fields = [(0, "Uint32", opcode_index), (1, "UOffsetTRelative", _ints(b, ins)),
                  (2, "UOffsetTRelative", _ints(b, outs))]
        if opts is not None:
            fields += [(3, "Uint8", _OPTS[opts]), (4, "UOffsetTRelative", _table(b, ofields))]
        ops.append(_table(b, fields))
    subgraph = _table(b, [(0, "UOffsetTRelative", _offsets(b, tensors)),
                          (1, "UOffsetTRelative", _ints(b, [in_t])),
                          (2, "UOffsetTRelative", _ints(b, [out_t])),
                          (3, "UOffsetTRelative", _offsets(b, ops)),
                          (4, "UOffsetTRelative", b.CreateString("main"))])
    # OperatorCode: deprecated_builtin_code (0, int8, 127 = "see builtin_code"), version (2), builtin_code (3)
    codes = [_table(b, [(0, "Int8", min(c, 127)), (2, "Int32", 1), (3, "Int32", c)]) for c in g.opcodes]
    maps = [_table(b, [(0, "UOffsetTRelative", b.CreateString(n)), (1, "Uint32", i)])
            for n, i in ((input_name, in_t), (output_name, out_t))]
    sig = _table(b, [(0, "UOffsetTRelative", _offsets(b, maps[:1])), (1, "UOffsetTRelative", _offsets(b, maps[1:])),
                     (2, "UOffsetTRelative", b.CreateString("serving_default")), (4, "Uint32", 0)])
    model = _table(b, [(0, "Uint32", 3), (1, "UOffsetTRelative", _offsets(b, codes)),
                       (2, "UOffsetTRelative", _offsets(b, [subgraph])),
                       (3, "UOffsetTRelative", b.CreateString("rtserve.export.tflite_writer")),
                       (4, "UOffsetTRelative", _offsets(b, buffers)),
                       (7, "UOffsetTRelative", _offsets(b, [sig]))])
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


def _chain(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (qualified name, layer) chain of a module, via torch.fx; ValueError if it is not one."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:
        raise ValueError(f"{type(module).__name__} cannot be traced into a chain of layers: {e}") from None
    layers, prev = [], None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise ValueError("the module must take exactly one input")
            prev = node
        elif node.op == "call_module":
            if node.args != (prev,) or node.kwargs:
                raise ValueError(f"layer '{node.target}' is not fed by the previous layer alone")
            layers.append((str(node.target), gm.get_submodule(node.target)))
            prev = node
        elif node.op == "output":
            if node.args[0] is not prev:
                raise ValueError("the module's output is not its last layer's output")
        else:
            raise ValueError(f"operation '{node.name}' ({node.op} {node.target}) is not a layer call; "
                             f"the TFLite writer supports only a chain of: {_SUPPORTED}")
    return layers


def _pads(size: int, k: int, s: int, d: int, before: int, out: int):
    """'SAME' / 'VALID' when TFLite's padding scheme gives torch's output size and leading pad."""
    keff = d * (k - 1) + 1
    same_out = -(-size // s)
    same_before = max((same_out - 1) * s + keff - size, 0) // 2
    if (same_out, same_before) == (out, before):
        return _SAME
    if ((size - keff) // s + 1, 0) == (out, before):
        return _VALID
    return None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


class _Converter:
    """Appends the operations of one layer after another to a :class:`_Graph`.

    ``cur`` is the TFLite tensor holding the current activation; ``nhwc`` says whether it is the
    NHWC form of torch's NCHW activation (true after a conv/pool layer, until something that needs
    torch's layout gets a TRANSPOSE back). Tensors are added in the order the file lists them.
    """

    def __init__(self, g: _Graph, cur: int) -> None:
        self.g, self.cur, self.nhwc = g, cur, False

    def to_layout(self, want_nhwc: bool, shape) -> None:
        """TRANSPOSE the current activation (of torch shape ``shape``) into the wanted layout."""
        g = self.g
        if self.nhwc != want_nhwc:
            perm = _TO_NHWC if want_nhwc else _TO_NCHW
            out = g.tensor(f"{g.tensors[self.cur]['name']}/transpose",
                           tuple(shape[p] for p in _TO_NHWC) if want_nhwc else tuple(shape))
            g.op("TRANSPOSE", [self.cur, g.const(f"perm{len(g.tensors)}", perm, _INT32)], [out])
            self.cur, self.nhwc = out, want_nhwc

    def layer(self, name: str, layer: nn.Module, shape: tuple, oshape: tuple) -> None:
        """Convert one supported layer whose input has torch shape ``shape`` and output ``oshape``."""
        g, rank = self.g, len(shape)
        if isinstance(layer, (nn.Identity, nn.Dropout)):
            return
        if isinstance(layer, nn.ReLU):
            out = g.tensor(name, tuple(oshape[p] for p in _TO_NHWC) if self.nhwc else oshape)
            g.op("RELU", [self.cur], [out])
        elif isinstance(layer, nn.Linear):
            self.to_layout(False, shape)
            out = g.tensor(name, oshape)
            bias = g.const(f"{name}.bias", _np(layer.bias)) if layer.bias is not None else -1
            g.op("FULLY_CONNECTED", [self.cur, g.const(f"{name}.weight", _np(layer.weight)), bias], [out],
                 "FullyConnectedOptions", [(0, "Int8", 0), (2, "Bool", rank > 2)])
        elif isinstance(layer, nn.Softmax):
            if layer.dim not in (-1, rank - 1):
                raise ValueError(f"layer '{name}' (Softmax): only dim=-1 is supported, got dim={layer.dim}")
            self.to_layout(False, shape)
            out = g.tensor(name, oshape)
            g.op("SOFTMAX", [self.cur], [out], "SoftmaxOptions", [(0, "Float32", 1.0)])
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim not in (-1, rank - 1):
                raise ValueError(f"layer '{name}' (Flatten): only start_dim=1, end_dim=-1 is supported")
            if rank == 2:
                return
            self.to_layout(False, shape)
            out = g.tensor(name, oshape)
            g.op("RESHAPE", [self.cur, g.const(f"{name}.shape", [-1, oshape[1]], _INT32)], [out])
        else:  # nn.Conv2d, nn.MaxPool2d
            out = self._spatial(name, layer, shape, oshape)
        self.cur = out

    def _spatial(self, name: str, layer: nn.Conv2d | nn.MaxPool2d, shape: tuple, oshape: tuple) -> int:
        """CONV_2D or MAX_POOL_2D in NHWC (PAD first when SAME/VALID cannot express a conv's
        padding); returns the output tensor."""
        g, kind = self.g, type(layer).__name__
        if len(shape) != 4:
            raise ValueError(f"layer '{name}' ({kind}): needs a 4-d NCHW input, got {list(shape)}")
        k, s = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
        d = _pair(layer.dilation)
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise ValueError(f"layer '{name}' (Conv2d): only groups=1 and padding_mode='zeros'")
            p = layer.padding
            if isinstance(p, str):  # torch 'same' puts the odd pixel after, as TFLite does
                p = (0, 0) if p == "valid" else tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
            p = _pair(p)
        else:
            if d != (1, 1) or layer.return_indices:
                raise ValueError(f"layer '{name}' (MaxPool2d): dilation and return_indices unsupported")
            p = _pair(layer.padding)
        modes = [_pads(shape[2 + i], k[i], s[i], d[i], p[i], oshape[2 + i]) for i in (0, 1)]
        padding = modes[0] if modes[0] == modes[1] and modes[0] is not None else None
        self.to_layout(True, shape)
        if padding is None and isinstance(layer, nn.Conv2d):
            # Explicit zero padding, then VALID: torch's padding p on every side.
            padded = (shape[0], shape[2] + 2 * p[0], shape[3] + 2 * p[1], shape[1])
            pad_out = g.tensor(f"{name}/pad", padded)
            pads = [[0, 0], [p[0], p[0]], [p[1], p[1]], [0, 0]]
            g.op("PAD", [self.cur, g.const(f"{name}.paddings", pads, _INT32)], [pad_out])
            self.cur, padding = pad_out, _VALID
        elif padding is None:
            raise ValueError(f"layer '{name}' (MaxPool2d): padding={layer.padding}, "
                             f"ceil_mode={layer.ceil_mode} has no TFLite SAME/VALID equivalent here")
        out = g.tensor(name, tuple(oshape[i] for i in _TO_NHWC))
        if isinstance(layer, nn.Conv2d):
            weight = g.const(f"{name}.weight", _np(layer.weight).transpose(0, 2, 3, 1))  # OIHW -> OHWI
            b = _np(layer.bias) if layer.bias is not None else np.zeros(oshape[1], np.float32)
            g.op("CONV_2D", [self.cur, weight, g.const(f"{name}.bias", b)], [out], "Conv2DOptions",
                 [(0, "Int8", padding), (1, "Int32", s[1]), (2, "Int32", s[0]), (3, "Int8", 0),
                  (4, "Int32", d[1]), (5, "Int32", d[0])])
        else:
            g.op("MAX_POOL_2D", [self.cur], [out], "Pool2DOptions",
                 [(0, "Int8", padding), (1, "Int32", s[1]), (2, "Int32", s[0]),
                  (3, "Int32", k[1]), (4, "Int32", k[0]), (5, "Int8", 0)])
        self.nhwc = True
        return out


def write_tflite(module: nn.Module, example_input: torch.Tensor, path, input_name: str = "input",
                 output_name: str = "output") -> Path:
    """Convert ``module`` (see the module docstring for the subset) and write it to ``path``.

    ``example_input`` fixes every dimension but the first (the batch, dynamic in the file).
    Returns the path written. Raises ``ValueError`` for an unsupported layer or configuration.
    """
    if example_input.dim() < 2:
        raise ValueError("example_input needs a batch dimension and at least one more")
    g = _Graph()
    x = example_input.detach().to(torch.float32)
    in_t = g.tensor(input_name, tuple(x.shape))
    conv = _Converter(g, in_t)
    with torch.no_grad():
        for name, layer in _chain(module):
            if not isinstance(layer, _LAYERS):
                raise ValueError(f"layer '{name}' ({type(layer).__name__}) is not supported by the TFLite "
                                 f"writer; supported: {_SUPPORTED}")
            y = layer(x)
            conv.layer(name, layer, tuple(x.shape), tuple(y.shape))
            x = y
    conv.to_layout(False, tuple(x.shape))
    if conv.cur == in_t:
        raise ValueError("the module has no layer that produces an operation")
    g.tensors[conv.cur]["name"] = output_name
    path = Path(path)
    path.write_bytes(_serialize(g, in_t, conv.cur, input_name, output_name))
    return path
