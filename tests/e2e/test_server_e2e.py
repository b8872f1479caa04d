"""End to end against the REAL server: ``python -m rtserve serve`` in a subprocess on loopback,
driven by the unmodified ``tritonclient.http``, the ``rtserve infer`` CLI, httpx and raw sockets.

Servers:
- ``server``: module-scoped, the default configuration; most tests share it.
- ``guarded``: module-scoped, ``RTSERVE_API_KEY=secret`` and ``--max-body-bytes 100000`` (body limits
  and the API key; a 64-row request for ``slow`` is 256 KiB, so the slow tests cannot run on it).
- a short-lived one per SIGTERM test, which the test kills.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from models import expected
from servers import start_server

LABELS = ["cat", "dog", "bird"]
SLOW_INFER = "/v2/models/slow/infer"
AFFINE_INFER = "/v2/models/affine/infer"


# -- server processes ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="module")
def all_versions_repo(affine_repo, tmp_path_factory) -> Path:
    """The shared repository, with 'affine' serving both its versions (the default policy serves the
    latest only)."""
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    shutil.copytree(affine_repo, repo)
    with open(repo / "affine" / "model.yaml", "a") as f:
        f.write("version_policy: all\n")
    return repo


@pytest.fixture(scope="module")
def server(all_versions_repo, log_dir):
    with start_server(all_versions_repo, log_dir) as srv:
        yield srv
        # nothing a test sent may have hit an unhandled exception in the server
        assert "unhandled error" not in srv.log_text()
        assert "Traceback" not in srv.log_text()


@pytest.fixture(scope="module")
def guarded(affine_repo, log_dir):
    with start_server(affine_repo, log_dir, "--max-body-bytes", "100000", env={"RTSERVE_API_KEY": "secret"}) as srv:
        yield srv
        assert "Traceback" not in srv.log_text()


# -- helpers --------------------------------------------------------------------------------------

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        out[(m.group(1), tuple(sorted(_LABEL.findall(m.group(2) or ""))))] = float(m.group(3))
    return out


def metric(url: str, name: str, **labels) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(cond, timeout: float, what: str, interval: float = 0.003) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(interval)


def wait_slow_busy(url: str) -> None:
    wait_for(lambda: metric(url, "rtserve_batches_in_flight", model="slow", version="1") == 1, 10,
             "a batch of 'slow' in flight")


def wait_slow_queued(url: str, n: int) -> None:
    wait_for(lambda: metric(url, "rtserve_queue_depth", model="slow", version="1") == n, 10,
             f"{n} requests queued for 'slow'")


def infer_body(x: np.ndarray, binary: bool = True, **params) -> tuple[bytes, dict]:
    """A KServe v2 request for input 'x' (FP32): (body, headers)."""
    t: dict = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        t["parameters"] = {"binary_data_size": x.nbytes}
    else:
        t["data"] = x.reshape(-1).tolist()
    header = orjson.dumps({"inputs": [t], "parameters": params})
    if not binary:
        return header, {"content-type": "application/json"}
    return header + x.astype(np.float32).tobytes(), {"inference-header-content-length": str(len(header))}


def slow_x(rows: int = 64) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 1024), dtype=np.float32)


def raw_request(path: str, body: bytes, headers: dict | None = None, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class RawConn:
    """One HTTP/1.1 exchange on a plain socket, so a test controls exactly when bytes go out."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)

    def send(self, data: bytes) -> "RawConn":
        self.sock.sendall(data)
        return self

    def response(self) -> tuple[int, dict, bytes]:
        r = http.client.HTTPResponse(self.sock, method="POST")
        r.begin()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body

    def has_answer(self) -> bool:
        """Whether the server has sent anything (or closed) on this connection yet; does not consume."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(60)

    def close(self) -> None:
        self.sock.close()


def decode_outputs(body: bytes, headers: dict) -> dict[str, np.ndarray]:
    from rtserve.client import decode_response

    return decode_response(body, headers.get("inference-header-content-length"))


def triton_input(x: np.ndarray, binary: bool = True, name: str = "x", datatype: str = "FP32") -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


X3 = np.array([[1, 2, 3, 4], [0, 0, 1, 0], [-2.5, 7, 0.5, 1]], np.float32)


# == 1. tritonclient, unmodified =====================================================================

def test_triton_health_metadata_config_index(server):
    c = server.triton()
    assert c.is_server_live() is True
    assert c.is_server_ready() is True
    assert c.is_model_ready("affine") is True
    assert c.is_model_ready("affine", "1") is True
    assert c.is_model_ready("affine", "2") is True
    assert c.is_model_ready("affine", "9") is False
    assert c.is_model_ready("no_such_model") is False
    assert c.is_model_ready("affine_pt2", "2") is False

    meta = c.get_server_metadata()
    assert meta["name"] == "rtserve" and meta["version"]
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])

    m = c.get_model_metadata("affine")
    assert m["name"] == "affine" and m["versions"] == ["1", "2"]  # no version named: every served one
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert m["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert c.get_model_metadata("affine", "1")["versions"] == ["1"]
    assert c.get_model_metadata("affine_pt2")["inputs"][0]["shape"] == [-1, 4]
    labels_meta = c.get_model_metadata("affine_labels")
    assert {"name": "label", "datatype": "BYTES", "shape": [-1]} in labels_meta["outputs"]

    cfg = c.get_model_config("affine")
    assert cfg["name"] == "affine" and cfg["max_batch_size"] == 8
    assert cfg["dynamic_batching"]["max_queue_size"] == 64
    slow_cfg = c.get_model_config("slow")
    assert slow_cfg["max_batch_size"] == 64 and slow_cfg["dynamic_batching"]["max_queue_size"] == 2

    index = c.get_model_repository_index()
    states = {(e["name"], e.get("version")): e["state"] for e in index}
    for key in [("affine", "1"), ("affine", "2"), ("affine_pt2", "1"), ("affine_labels", "1"), ("slow", "1")]:
        assert states.get(key) == "READY", (key, index)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_infer_affine(server, binary):
    c = server.triton()
    r = c.infer("affine", [triton_input(X3, binary)],
                outputs=[tc.InferRequestedOutput("y", binary_data=binary)], request_id="req-7")
    np.testing.assert_allclose(r.as_numpy("y"), expected(X3), rtol=1e-6, atol=1e-6)
    resp = r.get_response()
    assert resp["model_name"] == "affine" and resp["model_version"] == "2" and resp["id"] == "req-7"
    (out,) = resp["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [3, 3]
    if binary:
        assert out["parameters"]["binary_data_size"] == 3 * 3 * 4 and "data" not in out
    else:
        assert "data" in out and "binary_data_size" not in (out.get("parameters") or {})


def test_triton_infer_version_specific_and_pt2(server):
    c = server.triton()
    for version in ("1", "2"):
        r = c.infer("affine", [triton_input(X3)], model_version=version)
        assert r.get_response()["model_version"] == version
        np.testing.assert_allclose(r.as_numpy("y"), expected(X3), rtol=1e-6, atol=1e-6)
    for binary in (True, False):
        r = c.infer("affine_pt2", [triton_input(X3, binary)],
                    outputs=[tc.InferRequestedOutput("y", binary_data=binary)])
        assert r.get_response()["model_name"] == "affine_pt2"
        np.testing.assert_allclose(r.as_numpy("y"), expected(X3), rtol=1e-5, atol=1e-5)


def test_triton_labels_and_classification(server):
    c = server.triton()
    x = np.array([[1, 0, 0, 0], [0, 5, 0, 0], [-5, -10, 0, 0]], np.float32)
    y = expected(x)
    assert [LABELS[i] for i in y.argmax(1)] == ["bird", "dog", "cat"]  # the rows are chosen to cover all labels

    r = c.infer("affine_labels", [triton_input(x)])
    assert r.as_numpy("label").tolist() == [b"bird", b"dog", b"cat"]
    np.testing.assert_allclose(r.as_numpy("y"), y, rtol=1e-6)
    # the label output in JSON too
    r = c.infer("affine_labels", [triton_input(x, False)],
                outputs=[tc.InferRequestedOutput("label", binary_data=False)])
    assert [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("label").tolist()] == ["bird", "dog", "cat"]

    for binary in (True, False):
        r = c.infer("affine_labels", [triton_input(x)],
                    outputs=[tc.InferRequestedOutput("y", binary_data=binary, class_count=2)])
        got = r.as_numpy("y")
        assert got.shape == (3, 2)
        for row, scores in zip(got, y):
            top = np.argsort(-scores, kind="stable")[:2]
            want = [f"{scores[j]:f}:{j}:{LABELS[j]}" for j in top]
            assert [v.decode() if isinstance(v, bytes) else v for v in row] == want


@pytest.mark.parametrize("model,version,name,dtype,shape,status,needles", [
    ("no_such_model", "", "x", "FP32", [1, 4], "404", ["unknown model", "no_such_model"]),
    ("affine", "9", "x", "FP32", [1, 4], "404", ["no version '9'"]),
    ("affine", "", "z", "FP32", [1, 4], "400", ["unknown input 'z'"]),
    ("affine", "", "x", "FP32", [1, 5], "400", ["shape [1, 5]", "does not match"]),
    ("affine", "", "x", "FP32", [4], "400", ["shape [4]", "does not match"]),
    ("affine", "", "x", "FP32", [9, 4], "400", ["max_batch_size 8"]),
    ("affine", "", "x", "INT32", [1, 4], "400", ["input 'x' must be FP32"]),
])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_errors(server, model, version, name, dtype, shape, status, needles, binary):
    c = server.triton()
    arr = np.ones(shape, dtype=np.int32 if dtype == "INT32" else np.float32)
    with pytest.raises(InferenceServerException) as e:
        c.infer(model, [triton_input(arr, binary, name, dtype)], model_version=version)
    assert e.value.status() == status, e.value
    for needle in needles:
        assert needle in e.value.message(), e.value.message()


def test_triton_unload_then_load(server):
    c = server.triton()
    c.unload_model("affine_pt2")
    assert c.is_model_ready("affine_pt2") is False
    index = {(e["name"], e.get("version")): e for e in c.get_model_repository_index()}
    assert index[("affine_pt2", None)]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as e:
        c.infer("affine_pt2", [triton_input(X3)])
    assert e.value.status() == "503" and "not ready" in e.value.message()
    assert c.is_model_ready("affine") is True  # the others keep serving

    c.load_model("affine_pt2")
    assert c.is_model_ready("affine_pt2") is True
    r = c.infer("affine_pt2", [triton_input(X3)])
    np.testing.assert_allclose(r.as_numpy("y"), expected(X3), rtol=1e-5, atol=1e-5)

    with pytest.raises(InferenceServerException) as e:
        c.load_model("no_such_model")
    assert e.value.status() == "404"


# == 2. the rtserve CLI ===========================================================================

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtserve", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_infer_npy_file_and_inline_json(server, tmp_path):
    x = np.array([[1, 2, 3, 4], [0, -1, 0.5, 2]], np.float32)
    np.save(tmp_path / "x.npy", x)
    out = run_cli("infer", "affine", "--input", f"x={tmp_path / 'x.npy'}", "--url", server.url)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.array(json.loads(out.stdout)["y"]), expected(x), rtol=1e-6)

    out = run_cli("infer", "affine", "--input", "x=[[1,2,3,4]]", "--url", server.url, "--json-tensors",
                  "--version", "1")
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.array(json.loads(out.stdout)["y"]), expected(np.array([[1, 2, 3, 4]], np.float32)))

    out = run_cli("infer", "affine_labels", "--input", "x=[[0,5,0,0]]", "--url", server.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["label"] == ["dog"]

    out = run_cli("infer", "affine", "--input", "x=[[1,2]]", "--url", server.url)
    assert out.returncode == 1 and "400" in out.stderr and "does not match" in out.stderr


# == 3. hostile and malformed requests ===============================================================

_HDR_OK = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 16}}]})
_HDR_12 = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 12}}]})


def _json_infer(**tensor_overrides) -> bytes:
    t = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], **tensor_overrides}
    return orjson.dumps({"inputs": [t]})


MALFORMED = [
    # (id, method, path, body, headers, status, needle in the error)
    ("truncated-json", "POST", AFFINE_INFER, b'{"inputs": [{"name": "x", "shape": [1', {}, 400, "malformed JSON"),
    ("not-json", "POST", AFFINE_INFER, b"\xff\xfe garbage", {}, 400, "malformed JSON"),
    ("json-array", "POST", AFFINE_INFER, b"[1, 2, 3]", {}, 400, "JSON object"),
    ("no-inputs", "POST", AFFINE_INFER, b'{"inputs": []}', {}, 400, "inputs"),
    ("input-not-object", "POST", AFFINE_INFER, b'{"inputs": [3]}', {}, 400, "inputs[0]"),
    ("bad-shape", "POST", AFFINE_INFER, _json_infer(shape=[1, -4]), {}, 400, "shape"),
    ("shape-vs-data", "POST", AFFINE_INFER, _json_infer(shape=[2, 4]), {}, 400, "needs 8 elements"),
    ("data-not-numbers", "POST", AFFINE_INFER, _json_infer(data=["a", "b", "c", "d"]), {}, 400, "not a valid FP32"),
    ("unknown-datatype", "POST", AFFINE_INFER, _json_infer(datatype="FP99"), {}, 400, "FP99"),
    ("no-data", "POST", AFFINE_INFER, orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}),
     {}, 400, "no 'data'"),
    ("negative-timeout", "POST", AFFINE_INFER,
     orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                   "parameters": {"timeout": -5}}), {}, 400, "timeout"),
    ("priority-out-of-range", "POST", AFFINE_INFER,
     orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                   "parameters": {"priority": 7}}), {}, 400, "priority 7"),
    ("unknown-output", "POST", AFFINE_INFER,
     orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                   "outputs": [{"name": "nope"}]}), {}, 400, "unknown output 'nope'"),
    ("header-length-past-body", "POST", AFFINE_INFER, _HDR_OK + b"\0" * 16,
     {"inference-header-content-length": str(len(_HDR_OK) + 100)}, 400, "outside the body"),
    ("header-length-negative", "POST", AFFINE_INFER, _HDR_OK + b"\0" * 16,
     {"inference-header-content-length": "-1"}, 400, "outside the body"),
    ("header-length-not-int", "POST", AFFINE_INFER, _HDR_OK + b"\0" * 16,
     {"inference-header-content-length": "abc"}, 400, "not an integer"),
    ("binary-size-vs-shape", "POST", AFFINE_INFER, _HDR_12 + b"\0" * 12,
     {"inference-header-content-length": str(len(_HDR_12))}, 400, "does not match shape"),
    ("binary-size-past-end", "POST", AFFINE_INFER, _HDR_OK + b"\0" * 8,
     {"inference-header-content-length": str(len(_HDR_OK))}, 400, "runs past the end"),
    ("binary-trailing-bytes", "POST", AFFINE_INFER, _HDR_OK + b"\0" * 20,
     {"inference-header-content-length": str(len(_HDR_OK))}, 400, "add up to"),
    ("bad-gzip", "POST", AFFINE_INFER, b"this is not gzip", {"content-encoding": "gzip"}, 400, "gzip"),
    ("unsupported-encoding", "POST", AFFINE_INFER, _json_infer(), {"content-encoding": "br"}, 400, "Content-Encoding"),
    ("get-on-infer", "GET", AFFINE_INFER, b"", {}, 405, "POST"),
    ("unknown-route", "GET", "/v2/nothing/here", b"", {}, 404, "no route"),
    ("unknown-model-route", "GET", "/v2/models/affine/bogus", b"", {}, 404, "no route"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_answer_4xx_with_json_error(server, case):
    _, method, path, body, headers, status, needle = case
    r = httpx.request(method, server.url + path, content=body, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert needle in err, err


def test_gzip_body_is_accepted(server):
    x = np.array([[1, 2, 3, 4]], np.float32)
    body, headers = infer_body(x, binary=False)
    r = httpx.post(server.url + AFFINE_INFER, content=gzip.compress(body),
                   headers={**headers, "content-encoding": "gzip"}, timeout=10)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(1, 3), expected(x))


def _raw_exchange(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Send ``data``; return whatever the server answers before it closes (or 3 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def test_garbage_on_the_socket_never_kills_the_server(server):
    x = np.array([[1, 2, 3, 4]], np.float32)
    garbage = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 a TLS hello is not HTTP\r\n\r\n",
        b"HELLO WORLD\r\n\r\n",
        b"\x00" * 512,
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n{}",
        b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for data in garbage:
        answer = _raw_exchange(server.port, data)
        assert not answer.startswith(b"HTTP/1.1 5"), (data[:60], answer[:200])
        if answer:  # either a 4xx or the connection closed without an answer
            assert answer.startswith(b"HTTP/1.1 4"), (data[:60], answer[:200])
        assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
    # a 200 KB header line: uvicorn/httptools set no header size limit; it must just not break anything
    answer = _raw_exchange(server.port, b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 5")
    assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
    # a client that promises a body and hangs up half way, and one that half-closes at once
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inp")
    _raw_exchange(server.port, b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{",
                  half_close=True)
    # the server keeps serving: a valid inference still succeeds, on raw HTTP/1.1 and with httpx
    body, headers = infer_body(x)
    status, rh, rb = RawConn(server.port).send(raw_request(AFFINE_INFER, body, headers)).response()
    assert status == 200
    np.testing.assert_allclose(decode_outputs(rb, rh)["y"], expected(x))
    r = httpx.post(server.url + AFFINE_INFER, content=body, headers=headers, timeout=10)
    assert r.status_code == 200
    assert metric(server.url, "rtserve_inference_request_failure_total",
                  model="affine", version="2", reason="backend") == 0


def test_malformed_request_then_valid_request_on_one_keepalive_connection(server):
    x = np.array([[0, 0, 1, 0]], np.float32)
    body, headers = infer_body(x)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(3):
            assert c.post(AFFINE_INFER, content=b"{not json").status_code == 400
            assert c.post(AFFINE_INFER, content=b"{" + b" " * 10).status_code == 400
            r = c.post(AFFINE_INFER, content=body, headers=headers)
            assert r.status_code == 200
            np.testing.assert_allclose(decode_outputs(r.content, dict(r.headers))["y"], expected(x))


# == 4. overload and deadlines on `slow` =========================================================

@pytest.mark.timeout(120)
def test_full_queue_answers_503_at_once_then_every_queued_request_succeeds(server):
    url = server.url
    body, headers = infer_body(slow_x(64))
    request = raw_request(SLOW_INFER, body, headers)
    first = RawConn(server.port)
    queued = [RawConn(server.port), RawConn(server.port)]
    before = metric(url, "rtserve_inference_request_failure_total", model="slow", version="1", reason="queue_full")
    try:
        first.send(request)
        wait_slow_busy(url)
        for conn in queued:
            conn.send(request)
        wait_slow_queued(url, 2)

        t0 = time.perf_counter()
        status, rheaders, rbody = RawConn(server.port).send(request).response()
        elapsed = time.perf_counter() - t0
        assert status == 503, rbody
        assert elapsed < 0.5, elapsed
        assert int(rheaders["retry-after"]) >= 1
        assert "queue is full" in orjson.loads(rbody)["error"]
        # the instance was still busy with the first request while the queue was full
        assert metric(url, "rtserve_queue_depth", model="slow", version="1") >= 1

        for conn in [first, *queued]:
            status, rh, rb = conn.response()
            assert status == 200, rb
            assert decode_outputs(rb, rh)["y"].shape == (64, 1024)
    finally:
        for conn in [first, *queued]:
            conn.close()
    assert metric(url, "rtserve_inference_request_failure_total", model="slow", version="1",
                  reason="queue_full") >= before + 1
    wait_for(lambda: metric(url, "rtserve_queue_depth", model="slow", version="1") == 0, 10, "an empty queue")


@pytest.mark.timeout(120)
def test_request_timeout_answers_504_before_the_busy_batch_ends(server):
    url = server.url
    body, headers = infer_body(slow_x(64))
    request = raw_request(SLOW_INFER, body, headers)
    busy = [RawConn(server.port), RawConn(server.port)]
    rows_before = metric(url, "rtserve_inference_count_total", model="slow", version="1")
    timeouts_before = metric(url, "rtserve_inference_request_failure_total", model="slow", version="1",
                             reason="timeout")
    try:
        busy[0].send(request)
        wait_slow_busy(url)
        busy[1].send(request)  # queued behind the running batch: work for ~2 batches
        tbody, theaders = infer_body(slow_x(3), timeout=50_000)  # 50 ms, in microseconds
        t0 = time.perf_counter()
        r = httpx.post(url + SLOW_INFER, content=tbody, headers=theaders, timeout=30)
        elapsed = time.perf_counter() - t0
        # the queued busy request cannot have been answered yet: the timeout came well before
        assert not busy[1].has_answer(), "the busy work finished before the deadline answer"
        assert r.status_code == 504, r.text
        assert "timed out" in r.json()["error"]
        assert 0.04 <= elapsed < 0.3, elapsed
        for conn in busy:
            status, _, rb = conn.response()
            assert status == 200, rb
    finally:
        for conn in busy:
            conn.close()
    assert metric(url, "rtserve_inference_request_failure_total", model="slow", version="1",
                  reason="timeout") == timeouts_before + 1
    # the timed-out request's 3 rows were never computed
    assert metric(url, "rtserve_inference_count_total", model="slow", version="1") == rows_before + 128


def test_timeout_that_is_not_reached_does_not_fail_the_request(server):
    x = np.array([[1, 2, 3, 4]], np.float32)
    body, headers = infer_body(x, timeout=5_000_000)
    r = httpx.post(server.url + AFFINE_INFER, content=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(decode_outputs(r.content, dict(r.headers))["y"], expected(x))


# == 5. client disconnect =======================================================================

@pytest.mark.timeout(120)
def test_client_disconnect_cancels_the_queued_request(server):
    url = server.url
    cancelled_before = metric(url, "rtserve_inference_request_failure_total", model="slow", version="1",
                              reason="cancelled")
    rows_before = metric(url, "rtserve_inference_count_total", model="slow", version="1")
    success_before = metric(url, "rtserve_inference_request_success_total", model="slow", version="1")
    body, headers = infer_body(slow_x(64))
    busy = RawConn(server.port)
    try:
        busy.send(raw_request(SLOW_INFER, body, headers))
        wait_slow_busy(url)
        gbody, gheaders = infer_body(slow_x(7))
        gone = RawConn(server.port).send(raw_request(SLOW_INFER, gbody, gheaders))
        wait_slow_queued(url, 1)
        gone.close()  # before its turn: the 64-row batch is still running
        wait_for(lambda: metric(url, "rtserve_inference_request_failure_total", model="slow", version="1",
                                reason="cancelled") == cancelled_before + 1, 5, "the cancellation to be counted")
        # it left the queue (whether it left before its turn is checked below, by the rows computed:
        # not by timing, which a loaded machine can stretch past the busy batch)
        assert metric(url, "rtserve_queue_depth", model="slow", version="1") == 0
        status, rh, rb = busy.response()
        assert status == 200, rb
    finally:
        busy.close()
    # let any (wrongly) computed batch land in the counters before reading them
    wait_for(lambda: metric(url, "rtserve_batches_in_flight", model="slow", version="1") == 0, 10, "idle instance")
    time.sleep(0.3)
    assert metric(url, "rtserve_inference_count_total", model="slow", version="1") == rows_before + 64
    assert metric(url, "rtserve_inference_request_success_total", model="slow", version="1") == success_before + 1
    # the server still serves the model
    r = httpx.post(url + SLOW_INFER, content=gbody, headers=gheaders, timeout=30)
    assert r.status_code == 200


# == 7. /metrics and /openapi.json ================================================================

def test_metrics_and_openapi(server):
    url = server.url
    x = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.float32)
    body, headers = infer_body(x)
    for _ in range(3):
        assert httpx.post(url + AFFINE_INFER, content=body, headers=headers, timeout=10).status_code == 200
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    m = scrape(url)
    lab = (("model", "affine"), ("version", "2"))
    assert m[("rtserve_inference_request_success_total", lab)] >= 3
    assert m[("rtserve_inference_count_total", lab)] >= 6
    assert m[("rtserve_inference_exec_count_total", lab)] >= 1
    assert ("rtserve_queue_depth", lab) in m and m[("rtserve_queue_depth", lab)] == 0
    assert m[("rtserve_batches_in_flight", lab)] == 0
    for fam in ("rtserve_request_duration_seconds", "rtserve_batch_size", "rtserve_queue_duration_seconds",
                "rtserve_compute_duration_seconds"):
        assert f"# TYPE {fam} histogram" in text, fam
        buckets = sorted(
            ((float("inf") if dict(k[1])["le"] == "+Inf" else float(dict(k[1])["le"])), v)
            for k, v in m.items() if k[0] == fam + "_bucket"
            and dict(k[1]).get("model") == "affine" and dict(k[1]).get("version") == "2")
        assert len(buckets) > 3, fam
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{fam} buckets are not cumulative"
        assert buckets[-1][0] == float("inf") and buckets[-1][1] >= 1, fam
        assert m[(fam + "_count", lab)] == buckets[-1][1], fam
        assert m[(fam + "_sum", lab)] >= 0
    # one lone 5-row request is one batch of 5: it lands in the (4, 8] bucket and adds 5 to the sum
    body5, headers5 = infer_body(np.arange(20, dtype=np.float32).reshape(5, 4))
    assert httpx.post(url + AFFINE_INFER, content=body5, headers=headers5, timeout=10).status_code == 200
    m2 = scrape(url)

    def delta(name, **extra):
        key = (name, tuple(sorted({"model": "affine", "version": "2", **extra}.items())))
        return m2[key] - m[key]

    assert delta("rtserve_batch_size_bucket", le="4") == 0
    assert delta("rtserve_batch_size_bucket", le="8") == 1
    assert delta("rtserve_batch_size_sum") == 5 and delta("rtserve_batch_size_count") == 1
    assert delta("rtserve_inference_count_total") == 5 and delta("rtserve_inference_exec_count_total") == 1
    assert delta("rtserve_inference_request_success_total") == 1
    assert delta("rtserve_request_duration_seconds_count") == 1
    assert delta("rtserve_queue_duration_seconds_count") == 1
    assert delta("rtserve_compute_duration_seconds_count") == 1
    # the slow model was exercised by the tests above (module order) or at least is registered
    assert ("rtserve_queue_depth", (("model", "slow"), ("version", "1"))) in m

    r = httpx.get(url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert "/v2/models/{model}/infer" in doc["paths"]
    assert "post" in doc["paths"]["/v2/models/{model}/infer"]
    assert "/v2/health/ready" in doc["paths"]


# == 3b/8. body limit and API key (the guarded server) ================================================

def test_body_over_the_limit_answers_413(guarded):
    url = guarded.url
    x = np.array([[1, 2, 3, 4]], np.float32)
    small, headers = infer_body(x)
    # declared by Content-Length
    big = b'{"inputs": []}' + b" " * 100_000
    r = httpx.post(url + AFFINE_INFER, content=big, timeout=10)
    assert r.status_code == 413 and "100000" in r.json()["error"]
    # streamed without a Content-Length (chunked): the limit is enforced while reading
    def chunks():
        for _ in range(30):
            yield b" " * 5000
    r = httpx.post(url + AFFINE_INFER, content=chunks(), timeout=10)
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["error"]
    # a small gzip body that inflates past the limit
    bomb = gzip.compress(b'{"inputs": []}' + b" " * 1_000_000)
    assert len(bomb) < 100_000
    r = httpx.post(url + AFFINE_INFER, content=bomb, headers={"content-encoding": "gzip"}, timeout=10)
    assert r.status_code == 413 and "decompressed" in r.json()["error"]
    # a body exactly at the limit is read (and rejected only as bad JSON); raw socket, Content-Length given
    at_limit = b"{" + b" " * (100_000 - 2) + b"}"
    status, _, rb = RawConn(guarded.port).send(raw_request(AFFINE_INFER, at_limit)).response()
    assert status == 400, rb
    # the server keeps serving
    r = httpx.post(url + AFFINE_INFER, content=small, headers=headers, timeout=10)
    assert r.status_code == 200
    np.testing.assert_allclose(decode_outputs(r.content, dict(r.headers))["y"], expected(x))


def test_api_key_guards_management_but_not_inference(guarded):
    url = guarded.url
    r = httpx.post(url + "/v2/repository/index", timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.post(url + "/v2/repository/index", headers={"Authorization": "Bearer wrong"},
                      timeout=10).status_code == 401
    r = httpx.post(url + "/v2/repository/index", headers={"Authorization": "Bearer secret"}, timeout=10)
    assert r.status_code == 200 and any(e["name"] == "affine" for e in r.json())
    assert httpx.post(url + "/v2/repository/index", headers={"X-API-Key": "secret"}, timeout=10).status_code == 200

    c = guarded.triton()
    with pytest.raises(InferenceServerException) as e:
        c.unload_model("affine_labels")
    assert e.value.status() == "401"
    assert c.is_model_ready("affine_labels") is True
    assert len(c.get_model_repository_index(headers={"Authorization": "Bearer secret"})) == 4

    # inference and health need no key
    x = np.array([[1, 2, 3, 4]], np.float32)
    body, headers = infer_body(x)
    r = httpx.post(url + AFFINE_INFER, content=body, headers=headers, timeout=10)
    assert r.status_code == 200
    np.testing.assert_allclose(decode_outputs(r.content, dict(r.headers))["y"], expected(x))
    assert c.infer("affine", [triton_input(x)]).as_numpy("y").tolist() == expected(x).tolist()
    assert httpx.get(url + "/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(url + "/v2/models/affine", timeout=10).status_code == 200


def test_default_version_policy_serves_only_the_latest_version(guarded):
    c = guarded.triton()
    assert c.is_model_ready("affine", "2") is True
    assert c.is_model_ready("affine", "1") is False
    x = np.array([[1, 2, 3, 4]], np.float32)
    with pytest.raises(InferenceServerException) as e:
        c.infer("affine", [triton_input(x)], model_version="1")
    assert e.value.status() == "404" and "served versions: 2" in e.value.message()
    idx = c.get_model_repository_index(headers={"X-API-Key": "secret"})
    assert [e["version"] for e in idx if e["name"] == "affine"] == ["2"]


# == 6. graceful shutdown =======================================================================

@pytest.mark.timeout(120)
def test_sigterm_answers_all_in_flight_and_queued_work_then_exits_0(affine_repo, log_dir):
    with start_server(affine_repo, log_dir) as srv:
        body, headers = infer_body(slow_x(64))
        request = raw_request(SLOW_INFER, body, headers)
        # an idle keep-alive connection (one request answered) must not hold the shutdown up
        idle = RawConn(srv.port).send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.response()[0] == 200
        conns = [RawConn(srv.port) for _ in range(3)]
        try:
            conns[0].send(request)
            wait_slow_busy(srv.url)
            conns[1].send(request)
            conns[2].send(request)
            wait_slow_queued(srv.url, 2)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)

            def not_ready() -> bool:  # readiness turns false, or new connections are refused
                try:
                    return httpx.get(srv.url + "/v2/health/ready", timeout=1).status_code == 503
                except httpx.HTTPError:
                    return True

            wait_for(not_ready, 5, "readiness to turn false after SIGTERM", interval=0.01)
            for conn in conns:
                status, rh, rb = conn.response()
                assert status == 200, rb
                assert decode_outputs(rb, rh)["y"].shape == (64, 1024)
            answered = time.monotonic()
        finally:
            for conn in conns:
                conn.close()
        rc = srv.proc.wait(30)
        assert rc == 0, srv.log_text()[-3000:]
        assert time.monotonic() - t0 < 30
        # the idle keep-alive connection (uvicorn keeps those 30 s) did not delay the exit
        assert time.monotonic() - answered < 10
        assert idle.sock.recv(1) == b""  # the server closed it
        idle.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        assert "Traceback" not in srv.log_text()
