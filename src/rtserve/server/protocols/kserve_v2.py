"""KServe v2 / Open Inference Protocol codec, with Triton's binary tensor data and
classification extensions, so the unmodified ``tritonclient.http`` works.

Only bytes and numpy here: no HTTP framework, no model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import orjson

from ...errors import InvalidInput
from ...models.base import OutputRequest, TensorRequest
from ...tensors import (
    deserialize_bytes_tensor, element_count, numpy_to_v2, serialize_bytes_tensor, to_bytes_array, v2_to_numpy,
)

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration", "schedule_policy"]


@dataclass
class DecodedRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[OutputRequest] | None  # None = all outputs
    binary_default: bool
    id: str | None = None
    priority: int | None = None
    timeout_s: float | None = None
    parameters: dict = field(default_factory=dict)

    def tensor_request(self) -> TensorRequest:
        return TensorRequest(self.inputs, self.outputs, self.priority, self.timeout_s)

    def binary(self, name: str) -> bool:
        """Whether output ``name`` goes back as binary data."""
        for o in self.outputs or ():
            if o.name == name:
                return o.binary
        return self.binary_default


def _param_int(params: dict, key: str) -> int | None:
    v = params.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidInput(f"parameter '{key}' must be a non-negative integer, got {v!r}")
    return v


def _object(value, where: str) -> dict:
    """An optional JSON object: absent or null is empty; anything else but an object is a 400."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be an object")
    return value


def header_length(headers: dict[bytes, bytes]) -> int | None:
    """Triton's ``Inference-Header-Content-Length``: where the JSON header ends (None: all JSON)."""
    hl = headers.get(HEADER_LENGTH.encode())
    try:
        return int(hl) if hl is not None else None
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} is not an integer") from None


#: ``check(name, datatype, shape)``: the model's check of one input, called before its data is
#: converted (raises InvalidInput), so an oversized batch costs no conversion.
InputCheck = Callable[[str, str, list], None]


def decode_request(body: bytes, header_length: int | None, check: InputCheck | None = None) -> DecodedRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors). ``check`` is called for
    each input once its name, datatype and shape are read, before its data is converted."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {header_length} is outside the body of {len(body)} bytes")
        json_part, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        json_part, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"malformed JSON in the request body: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the request must hold a non-empty 'inputs' list")
    params = _object(doc.get("parameters"), "'parameters'")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = t.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}] has no 'name'")
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        arr, used = _decode_tensor(name, t, binary, offset, check)
        offset += used
        inputs[name] = arr
    if offset != len(binary):
        raise InvalidInput(f"the binary section holds {len(binary)} bytes but the inputs' binary_data_size "
                           f"add up to {offset}")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameter 'binary_data_output' must be true or false")
    outputs = _decode_outputs(doc.get("outputs"), binary_default)
    timeout_us = _param_int(params, "timeout")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput("'id' must be a string")
    return DecodedRequest(
        inputs=inputs, outputs=outputs, binary_default=binary_default,
        id=rid,
        priority=_param_int(params, "priority"),
        timeout_s=timeout_us / 1e6 if timeout_us else None,
        parameters=params,
    )


def _decode_outputs(raw_outputs, binary_default: bool) -> list[OutputRequest] | None:
    """The requested outputs (None: every output); an output asked for twice is a 400."""
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise InvalidInput("'outputs' must be a list")
    outputs: list[OutputRequest] = []
    for j, o in enumerate(raw_outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput(f"outputs[{j}] must be an object with a 'name'")
        if any(prev.name == o["name"] for prev in outputs):
            raise InvalidInput(f"output '{o['name']}' is requested twice (outputs[{j}])")
        op = _object(o.get("parameters"), f"outputs[{j}].parameters")
        binary = op.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"outputs[{j}].parameters.binary_data must be true or false")
        outputs.append(OutputRequest(o["name"], binary, _param_int(op, "classification") or 0))
    return outputs


def _decode_tensor(name: str, t: dict, binary: memoryview, offset: int,
                   check: InputCheck | None = None) -> tuple[np.ndarray, int]:
    shape = t.get("shape")
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    datatype = t.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input '{name}': missing 'datatype'")
    if datatype == "BF16":
        raise InvalidInput(f"input '{name}': BF16 is not supported over HTTP by rtserve; send FP32")
    dtype = v2_to_numpy(datatype)
    count = element_count(shape)
    tparams = _object(t.get("parameters"), f"input '{name}': 'parameters'")
    size = tparams.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
    if check is not None:
        check(name, datatype, shape)  # before any data is converted
    if size is not None:
        if offset + size > len(binary):
            raise InvalidInput(f"input '{name}': binary_data_size {size} runs past the end of the body "
                               f"({len(binary) - offset} bytes left)")
        chunk = binary[offset:offset + size]
        if datatype == "BYTES":
            arr = deserialize_bytes_tensor(chunk, count)
            _check_utf8(name, arr)
        else:
            if size != count * dtype.itemsize:
                raise InvalidInput(f"input '{name}': binary_data_size {size} does not match shape {shape} "
                                   f"of {datatype} ({count * dtype.itemsize} bytes)")
            arr = np.frombuffer(chunk, dtype=dtype)
        return arr.reshape(shape), size
    if "data" not in t:
        raise InvalidInput(f"input '{name}': no 'data' and no binary_data_size")
    data = t["data"]
    if datatype == "BYTES":
        try:
            arr = to_bytes_array(data).reshape(-1)
        except (InvalidInput, ValueError):
            raise InvalidInput(f"input '{name}': BYTES data must be strings") from None
    else:
        arr = _json_numbers(name, datatype, dtype, data)
    if arr.size != count:
        raise InvalidInput(f"input '{name}': shape {shape} needs {count} elements, data holds {arr.size}")
    return arr.reshape(shape), 0


def _check_utf8(name: str, arr: np.ndarray) -> None:
    """BYTES inputs carry text (labels, sentences for an embedding step): invalid UTF-8 is a 400,
    never decoded with replacement characters further on."""
    for i, b in enumerate(arr):
        try:
            b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"input '{name}': BYTES element {i} is not valid UTF-8 ({e.reason} at byte "
                               f"{e.start}); BYTES tensors carry text, send binary data as UINT8") from None


def _json_numbers(name: str, datatype: str, dtype: np.dtype, data) -> np.ndarray:
    """JSON ``data`` (flat or nested) -> a flat array of ``dtype``. numpy first infers what the
    elements are, so that a null, a string, a fraction for an integer type or a number out of the
    type's range is a 400 naming the input, never a NaN, a parsed string or a wrapped value."""
    bad = f"input '{name}': data is not a valid {datatype} array"
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as e:  # ragged nesting
        raise InvalidInput(f"{bad}: {e}") from None
    if raw.size == 0:
        return np.empty(0, dtype)
    kind = raw.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"{bad}: {_first_wrong(data, lambda v: isinstance(v, bool), 'true or false')}")
        return raw.reshape(-1)
    if kind not in "iuf":
        raise InvalidInput(f"{bad}: {_first_wrong(data, _is_number, 'a number')}")
    if dtype.kind in "iu":
        return _json_ints(bad, datatype, dtype, data, raw)
    with np.errstate(over="ignore"):
        arr = raw.reshape(-1).astype(dtype)
    if not np.isfinite(arr).all():  # JSON numbers are finite: this one overflowed the type
        raise InvalidInput(f"{bad}: element {int(np.argmin(np.isfinite(arr)))} is outside {datatype}'s range")
    return arr


def _json_ints(bad: str, datatype: str, dtype: np.dtype, data, raw: np.ndarray) -> np.ndarray:
    """Integers (a float is taken when it is integral), exactly, within the type's range."""
    if raw.dtype.kind == "f":  # some elements were written as floats
        fractional = np.floor(raw) != raw
        if fractional.any():
            raise InvalidInput(f"{bad}: element {int(np.argmax(fractional))} is not an integer")
        if np.abs(raw).max() >= 2.0**53:  # float64 is not exact here: take the JSON values one by one
            raw = np.array([int(v) for v in _leaves(data)], dtype=object)
    info = np.iinfo(dtype)
    if int(raw.min()) < info.min or int(raw.max()) > info.max:
        raise InvalidInput(f"{bad}: a value is outside {datatype}'s range [{info.min}, {info.max}]")
    return raw.reshape(-1).astype(dtype)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _leaves(data):
    if isinstance(data, list):
        for x in data:
            yield from _leaves(x)
    else:
        yield data


def _first_wrong(data, ok: Callable[[object], bool], want: str) -> str:
    """'element i is <what it is>, not <want>' for the first leaf of ``data`` that is not ``want``
    (read from the JSON values: numpy may have turned them all into strings)."""
    for i, v in enumerate(_leaves(data)):
        if not ok(v):
            what = "null" if v is None else f"{type(v).__name__} {v!r}"[:60]
            return f"element {i} is {what}, not {want}"
    return "a value is too large for any numeric type"  # only numbers, one beyond 64 bits


def encode_tensors(tensors: list[tuple[str, np.ndarray, bool]]) -> tuple[list[dict], list[bytes]]:
    """Tensor entries for a request or response, and the binary sections of those sent as binary.

    JSON data stays a numpy array: serialize with ``orjson.OPT_SERIALIZE_NUMPY``.
    """
    items, blobs = [], []
    for name, arr, binary in tensors:
        datatype = numpy_to_v2(arr.dtype)
        entry: dict = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = serialize_bytes_tensor(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
        items.append(entry)
    return items, blobs


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """Build the response body. Returns (body, json_header_length or None when all JSON)."""
    items, blobs = encode_tensors(outputs)
    doc: dict = {"model_name": model_name, "model_version": model_version, "outputs": items}
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
