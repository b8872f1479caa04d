"""Tensor datatypes and specs: KServe v2 names <-> numpy, shape checks, BYTES codec."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput

# KServe v2 datatype name -> numpy dtype. BYTES is numpy object (each element bytes).
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}


def v2_to_numpy(datatype: str) -> np.dtype:
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInput(
            f"unsupported datatype '{datatype}'; expected one of {', '.join(V2_TO_NUMPY)}"
        ) from None


def numpy_to_v2(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no KServe v2 datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a KServe v2 datatype and a shape (-1 = variable dimension).

    For a model with ``max_batch_size > 0`` the shape excludes the batch dimension,
    as in Triton's model configuration; ``full_shape`` adds it back.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        v2_to_numpy(self.datatype)
        if any((not isinstance(d, int)) or d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"tensor '{self.name}': shape {list(self.shape)} must hold positive ints or -1")

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]

    def full_shape(self, batched: bool) -> list[int]:
        return ([-1] if batched else []) + list(self.shape)

    def check(self, shape: tuple[int, ...], batched: bool) -> None:
        """Raise InvalidInput unless ``shape`` (with the batch dim when batched) fits this spec."""
        expected = self.full_shape(batched)
        if len(shape) != len(expected) or any(e != -1 and e != s for e, s in zip(expected, shape)):
            raise InvalidInput(
                f"input '{self.name}': shape {list(shape)} does not match the model's {expected}"
            )

    def to_json(self, batched: bool) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.full_shape(batched)}


def element_count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- BYTES codec (Triton binary layout: <uint32 LE length><bytes> per element) ---

def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes_tensor(buf: bytes | memoryview, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    off = 0
    n = len(buf)
    for i in range(count):
        if off + 4 > n:
            raise InvalidInput("BYTES tensor data is truncated")
        (ln,) = struct.unpack_from("<I", buf, off)
        off += 4
        if off + ln > n:
            raise InvalidInput("BYTES tensor element runs past the end of its data")
        out[i] = bytes(buf[off : off + ln])
        off += ln
    if off != n:
        raise InvalidInput(f"BYTES tensor data holds more than {count} elements")
    return out


def to_bytes_array(values) -> np.ndarray:
    """JSON BYTES data (strings) -> numpy object array of bytes."""
    arr = np.array(values, dtype=object)
    flat = arr.reshape(-1)
    for i, v in enumerate(flat):
        if isinstance(v, str):
            flat[i] = v.encode("utf-8")
        elif not isinstance(v, bytes):
            raise InvalidInput("BYTES tensor data must be strings")
    return arr
