"""KServe v2 / Open Inference Protocol codec, with Triton's binary tensor data and
classification extensions, so the unmodified ``tritonclient.http`` works.

Only bytes and numpy here: no HTTP framework, no model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


def header_length(headers: dict[bytes, bytes]) -> int | None:
    """Triton's ``Inference-Header-Content-Length``: where the JSON header ends (None: all JSON)."""
    hl = headers.get(HEADER_LENGTH.encode())
    try:
        return int(hl) if hl is not None else None
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} is not an integer") from None


def decode_request(body: bytes, header_length: int | None) -> DecodedRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors)."""
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
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
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
        arr, used = _decode_tensor(name, t, binary, offset)
        offset += used
        inputs[name] = arr
    if offset != len(binary):
        raise InvalidInput(f"the binary section holds {len(binary)} bytes but the inputs' binary_data_size "
                           f"add up to {offset}")
    outputs = None
    raw_outputs = doc.get("outputs")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameter 'binary_data_output' must be true or false")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for j, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidInput(f"outputs[{j}] must be an object with a 'name'")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise InvalidInput(f"outputs[{j}].parameters must be an object")
            binary = op.get("binary_data", binary_default)
            if not isinstance(binary, bool):
                raise InvalidInput(f"outputs[{j}].parameters.binary_data must be true or false")
            outputs.append(OutputRequest(o["name"], binary,
                                         _param_int(op, "classification") or 0))
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


def _decode_tensor(name: str, t: dict, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
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
    tparams = t.get("parameters") or {}
    if not isinstance(tparams, dict):
        raise InvalidInput(f"input '{name}': 'parameters' must be an object")
    size = tparams.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidInput(f"input '{name}': binary_data_size {size} runs past the end of the body "
                               f"({len(binary) - offset} bytes left)")
        chunk = binary[offset:offset + size]
        if datatype == "BYTES":
            arr = deserialize_bytes_tensor(chunk, count)
        else:
            if size != count * dtype.itemsize:
                raise InvalidInput(f"input '{name}': binary_data_size {size} does not match shape {shape} "
                                   f"of {datatype} ({count * dtype.itemsize} bytes)")
            arr = np.frombuffer(chunk, dtype=dtype)
        return arr.reshape(shape), size
    if "data" not in t:
        raise InvalidInput(f"input '{name}': no 'data' and no binary_data_size")
    data = t["data"]
    try:
        if datatype == "BYTES":
            arr = to_bytes_array(data).reshape(-1)
        else:
            arr = np.asarray(data, dtype=dtype).reshape(-1)
    except InvalidInput:
        raise InvalidInput(f"input '{name}': BYTES data must be strings") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"input '{name}': data is not a valid {datatype} array: {e}") from None
    if arr.size != count:
        raise InvalidInput(f"input '{name}': shape {shape} needs {count} elements, data holds {arr.size}")
    return arr.reshape(shape), 0


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
