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


# -- strict decoding: nothing a client sends is silently changed or dropped ----------------------

def _one(datatype: str, data, shape=None, **extra) -> bytes:
    shape = shape if shape is not None else [len(data)]
    return orjson.dumps({"inputs": [{"name": "a", "shape": shape, "datatype": datatype, "data": data}], **extra})


@pytest.mark.parametrize("datatype,data", [
    ("FP32", [1.0, None, 3.0]), ("FP16", [1, None, 3]), ("FP64", [1.5, None, 2.5]),
    ("INT32", [1, None, 3]), ("UINT8", [1, None, 3]), ("BOOL", [True, None, False]),
])
def test_null_in_numeric_data_is_a_400_naming_the_input_and_the_element(datatype, data):
    with pytest.raises(InvalidInput, match=r"input 'a'.*element 1 is null"):
        decode_request(_one(datatype, data), None)
    with pytest.raises(InvalidInput, match=r"input 'a'.*element 2 is null"):  # nested data too
        decode_request(_one(datatype, [[data[0], data[2]], [None, data[0]]], shape=[2, 2]), None)


@pytest.mark.parametrize("datatype,data,needle", [
    ("FP32", ["1.5", "2"], "element 0 is str '1.5', not a number"),
    ("FP32", [1, "x"], "element 1 is str 'x', not a number"),
    ("FP32", [1, {"v": 2}], "element 1 is dict"),
    ("INT32", [1, 2.5], "element 1 is not an integer"),
    ("UINT8", [1, 300], "outside UINT8's range [0, 255]"),
    ("UINT8", [-1, 3], "outside UINT8's range"),
    ("INT8", [-129, 0], "outside INT8's range"),
    ("INT64", [2**63, 0], "outside INT64's range"),
    ("FP16", [1.0, 70000.0], "element 1 is outside FP16's range"),
    ("FP32", [1.0, 1e39], "element 1 is outside FP32's range"),
    ("BOOL", [True, 1], "element 1 is int 1, not true or false"),
    ("FP32", [[1, 2], [3]], "not a valid FP32 array"),
])
def test_json_data_that_does_not_fit_the_datatype_is_a_400(datatype, data, needle):
    shape = [2] if not isinstance(data[0], list) else [2, 2]
    with pytest.raises(InvalidInput, match="input 'a'") as e:
        decode_request(_one(datatype, data, shape=shape), None)
    assert needle in e.value.message


def test_json_numbers_that_fit_are_decoded_exactly():
    d = decode_request(orjson.dumps({"inputs": [
        {"name": "i", "shape": [3], "datatype": "INT64", "data": [2**63 - 1, -2**63, 3.0]},
        {"name": "j", "shape": [2], "datatype": "INT32", "data": [2.0, -7]},
        {"name": "u", "shape": [2], "datatype": "UINT64", "data": [2**64 - 1, 0]},
        {"name": "f", "shape": [2, 1], "datatype": "FP16", "data": [[1], [65504]]},
        {"name": "b", "shape": [0], "datatype": "BOOL", "data": []}]}), None)
    assert d.inputs["i"].tolist() == [2**63 - 1, -2**63, 3] and d.inputs["i"].dtype == np.int64
    assert d.inputs["j"].tolist() == [2, -7] and d.inputs["j"].dtype == np.int32
    assert d.inputs["u"].tolist() == [2**64 - 1, 0] and d.inputs["u"].dtype == np.uint64
    assert d.inputs["f"].tolist() == [[1.0], [65504.0]] and d.inputs["f"].dtype == np.float16
    assert d.inputs["b"].shape == (0,) and d.inputs["b"].dtype == np.bool_


def test_an_output_requested_twice_is_a_400():
    body = _one("FP32", [1.0], outputs=[{"name": "y"}, {"name": "z"}, {"name": "y", "parameters": {"binary_data": True}}])
    with pytest.raises(InvalidInput, match=r"output 'y' is requested twice \(outputs\[2\]\)"):
        decode_request(body, None)


@pytest.mark.parametrize("doc,needle", [
    ({"parameters": False}, "'parameters' must be an object"),
    ({"parameters": []}, "'parameters' must be an object"),
    ({"outputs": [{"name": "y", "parameters": 0}]}, "outputs[0].parameters must be an object"),
])
def test_parameters_that_are_not_objects_are_a_400(doc, needle):
    with pytest.raises(InvalidInput) as e:
        decode_request(_one("FP32", [1.0], **doc), None)
    assert needle in e.value.message
    with pytest.raises(InvalidInput, match="'parameters' must be an object"):
        decode_request(orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1],
                                                 "parameters": ""}]}), None)


def test_invalid_utf8_in_binary_bytes_is_a_400_naming_the_input():
    sb = serialize_bytes_tensor(np.array([b"fine", "h\u00e9".encode(), b"\xff\xfeoops"], dtype=object))
    header = orjson.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(sb)}}]})
    with pytest.raises(InvalidInput, match=r"input 'text': BYTES element 2 is not valid UTF-8"):
        decode_request(header + sb, len(header))
    ok = serialize_bytes_tensor(np.array([b"fine", "h\u00e9".encode()], dtype=object))
    header = orjson.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(ok)}}]})
    assert list(decode_request(header + ok, len(header)).inputs["text"]) == [b"fine", "h\u00e9".encode()]


def test_the_model_check_runs_on_each_input_before_its_data_is_converted():
    calls = []

    def check(name, datatype, shape):
        calls.append((name, datatype, list(shape)))
        if shape[0] > 8:
            raise InvalidInput(f"input '{name}': batch size {shape[0]} exceeds max_batch_size 8")

    good = {"name": "a", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]}
    # 100,000 rows whose last element is not a number: the batch size is refused, not the data
    big = {"name": "b", "shape": [100_000, 4], "datatype": "FP32", "data": [0.5] * 399_999 + ["x"]}
    with pytest.raises(InvalidInput, match="batch size 100000 exceeds max_batch_size 8"):
        decode_request(orjson.dumps({"inputs": [good, big]}), None, check)
    assert calls == [("a", "INT32", [2, 2]), ("b", "FP32", [100_000, 4])]
    # binary inputs too: checked before their bytes are read
    header = orjson.dumps({"inputs": [{"name": "c", "shape": [9, 1], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 3}}]})
    with pytest.raises(InvalidInput, match="batch size 9"):
        decode_request(header + b"abc", len(header), check)
    # without a check the same bad data is what is reported
    with pytest.raises(InvalidInput, match="element 399999 is str 'x'"):
        decode_request(orjson.dumps({"inputs": [big]}), None)
