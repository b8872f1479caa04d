"""KServe v2 codec: JSON and binary tensors, BYTES, round trips with rtserve.client's decoder."""
from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from rtserve.client import decode_response
from rtserve.errors import InvalidInput
from rtserve.models.outputs import classify
from rtserve.server.protocols.kserve_v2 import decode_request, encode_response
from rtserve.tensors import deserialize_bytes_tensor, serialize_bytes_tensor


def test_json_nested_and_flat_data_decode_the_same():
    flat = decode_request(orjson.dumps({"inputs": [{"name": "a", "shape": [2, 2], "datatype": "INT64",
                                                   "data": [1, 2, 3, 4]}]}), None)
    nested = decode_request(orjson.dumps({"inputs": [{"name": "a", "shape": [2, 2], "datatype": "INT64",
                                                     "data": [[1, 2], [3, 4]]}]}), None)
    np.testing.assert_array_equal(flat.inputs["a"], nested.inputs["a"])
    assert flat.inputs["a"].dtype == np.int64


def test_binary_inputs_in_order_with_bytes_and_params():
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    s = np.array([b"hi", b"", "héllo".encode()], dtype=object)
    sb = serialize_bytes_tensor(s)
    header = orjson.dumps({"id": "5", "parameters": {"priority": 1, "timeout": 2500, "binary_data_output": True},
                           "inputs": [
                               {"name": "a", "shape": [2, 3], "datatype": "FP16", "parameters": {"binary_data_size": a.nbytes}},
                               {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
                               {"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(sb)}}]})
    d = decode_request(header + a.tobytes() + sb, len(header))
    np.testing.assert_array_equal(d.inputs["a"], a)
    assert d.inputs["b"].tolist() == [True, False]
    assert list(d.inputs["s"]) == list(s)
    assert d.id == "5" and d.priority == 1 and d.timeout_s == pytest.approx(0.0025) and d.binary_default


def test_encode_then_decode_round_trip_json_and_binary():
    y = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    lab = np.array([b"cat", b"dog", b"bird"], dtype=object)
    for binary in (False, True):
        body, hl = encode_response("m", "1", "x", [("y", y, binary), ("label", lab, binary)])
        out = decode_response(body, str(hl) if hl is not None else None)
        np.testing.assert_allclose(out["y"], y, rtol=1e-6)
        assert list(out["label"]) == list(lab)


def test_bytes_codec_rejects_truncation():
    sb = serialize_bytes_tensor(np.array([b"abc", b"de"], dtype=object))
    with pytest.raises(InvalidInput, match="past the end"):
        deserialize_bytes_tensor(sb[:-1], 2)
    with pytest.raises(InvalidInput, match="more than"):
        deserialize_bytes_tensor(sb + b"\0\0\0\0", 2)
    with pytest.raises(InvalidInput, match="truncated"):
        deserialize_bytes_tensor(sb[:2], 1)


@pytest.mark.parametrize("doc,needle", [
    ({"id": 5, "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}, "'id' must be a string"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1], "parameters": [1]}]}, "must be an object"),
    ({"parameters": {"binary_data_output": "yes"}, "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]},
     "binary_data_output"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
      "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, "binary_data must be"),
])
def test_strict_types(doc, needle):
    with pytest.raises(InvalidInput, match=re.escape(needle)):
        decode_request(orjson.dumps(doc), None)


def test_classification_top_k():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], np.float32)
    out = classify(scores, 2, ["a", "b", "c"], batched=True)
    assert out.tolist() == [[b"0.700000:1:b", b"0.200000:2:c"], [b"0.500000:0:a", b"0.400000:2:c"]]
    assert classify(scores[0], 5, None, batched=False).shape == (3,)
