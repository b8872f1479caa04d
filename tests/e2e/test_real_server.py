"""End to end: the real server on loopback, driven by tritonclient, `rtserve infer`, raw sockets."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from models import expected

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(repo, *flags, env=None):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtserve", "serve", "--repo", str(repo), "--port", str(port), "--log-level", "warning",
         *flags],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start: " + proc.stdout.read().decode()[-3000:])
            time.sleep(0.2)
        yield proc, port, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(affine_repo):
    with running_server(affine_repo, "--max-body-bytes", "2000000") as (proc, port, url):
        yield port, url


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


SLOW = "/v2/models/slow/infer"


def slow_request(rows: int = 64, **params) -> tuple[bytes, dict]:
    """A binary-tensor request for the slow model: (body, headers)."""
    x = np.random.default_rng(rows).random((rows, 1024), dtype=np.float32)
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [rows, 1024], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}], "parameters": params})
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def post_in_thread(url: str, request: tuple[bytes, dict], results: list) -> threading.Thread:
    def go():
        r = httpx.post(url + SLOW, content=request[0], headers=request[1], timeout=60)
        results.append((r.status_code, r.headers, r.text))

    t = threading.Thread(target=go)
    t.start()
    return t


def wait_busy(url: str, timeout: float = 10) -> None:
    end = time.time() + timeout
    while metric(url, "rtserve_batches_in_flight", model="slow", version="1") < 1:
        assert time.time() < end, "the slow model never started running"
        time.sleep(0.005)


# -- tritonclient, unmodified -----------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_json_and_binary(server, binary):
    c = tc.InferenceServerClient(f"127.0.0.1:{server[0]}")
    x = np.array([[1, 2, 3, 4], [0, 0, 1, 0], [5, 5, 5, 5]], np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    for model in ("affine", "affine_pt2"):
        r = c.infer(model, [inp], outputs=[tc.InferRequestedOutput("y", binary_data=binary)])
        np.testing.assert_allclose(r.as_numpy("y"), expected(x), rtol=1e-6)
    r = c.infer("affine", [inp], model_version="2", request_id="abc")
    assert r.get_response()["model_version"] == "2" and r.get_response()["id"] == "abc"


def test_tritonclient_health_metadata_repository(server):
    c = tc.InferenceServerClient(f"127.0.0.1:{server[0]}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("affine")
    assert not c.is_model_ready("nope")
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata("affine_pt2")
    assert meta["platform"] == "pytorch_export" and meta["inputs"][0]["shape"] == [-1, 4]
    assert c.get_model_config("slow")["dynamic_batching"]["max_queue_size"] == 2
    idx = {(e["name"], e.get("version")): e["state"] for e in c.get_model_repository_index()}
    assert idx[("affine", "2")] == "READY" and idx[("slow", "1")] == "READY"


def test_tritonclient_labels_and_classification(server):
    c = tc.InferenceServerClient(f"127.0.0.1:{server[0]}")
    x = np.array([[1, 0, 0, 0], [0, 5, 0, 0]], np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer("affine_labels", [inp])
    assert r.as_numpy("label").tolist() == [b"bird", b"dog"]
    r = c.infer("affine_labels", [inp], outputs=[tc.InferRequestedOutput("y", class_count=2)])
    assert r.as_numpy("y")[1].tolist() == [b"4.000000:1:dog", b"2.000000:2:bird"]


@pytest.mark.parametrize("model,name,dtype,shape,status,needle", [
    ("nope", "x", "FP32", [1, 4], "404", "unknown model 'nope'"),
    ("affine", "z", "FP32", [1, 4], "400", "unknown input 'z'"),
    ("affine", "x", "FP32", [1, 5], "400", "does not match"),
    ("affine", "x", "INT32", [1, 4], "400", "must be FP32"),
])
def test_tritonclient_errors(server, model, name, dtype, shape, status, needle):
    c = tc.InferenceServerClient(f"127.0.0.1:{server[0]}")
    inp = tc.InferInput(name, shape, dtype)
    inp.set_data_from_numpy(np.ones(shape, dtype=np.float32 if dtype == "FP32" else np.int32))
    with pytest.raises(InferenceServerException) as e:
        c.infer(model, [inp])
    assert e.value.status() == status and needle in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.infer("affine", [inp], model_version="9")
    assert e.value.status() in ("404", "400")


def test_tritonclient_unload_and_load(server):
    c = tc.InferenceServerClient(f"127.0.0.1:{server[0]}")
    c.unload_model("affine_pt2")
    assert not c.is_model_ready("affine_pt2")
    c.load_model("affine_pt2")
    assert c.is_model_ready("affine_pt2")


# -- the CLI ------------------------------------------------------------------------------------

def test_rtserve_infer_cli(server, tmp_path):
    x = np.array([[1, 2, 3, 4]], np.float32)
    np.save(tmp_path / "x.npy", x)
    for value in (str(tmp_path / "x.npy"), "[[1,2,3,4]]"):
        out = subprocess.run([sys.executable, "-m", "rtserve", "infer", "affine", "--input", f"x={value}",
                              "--url", server[1]], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        np.testing.assert_allclose(np.array(json.loads(out.stdout)["y"]), expected(x))
    out = subprocess.run([sys.executable, "-m", "rtserve", "infer", "affine", "--input", "x=[[1,2]]",
                          "--url", server[1]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "does not match" in out.stderr
    out = subprocess.run([sys.executable, "-m", "rtserve", "models", "--url", server[1]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and re.search(r"affine\s+2\s+READY", out.stdout)


# -- hostile input --------------------------------------------------------------------------------

def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                if b"\r\n\r\n" in b"".join(chunks) and b"HTTP/1.1" in chunks[0]:
                    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                    m = re.search(rb"content-length: (\d+)", head, re.I)
                    if m and len(rest) >= int(m.group(1)):
                        break
        except socket.timeout:
            pass
    return b"".join(chunks)


def test_raw_malformed_requests_never_500_and_server_keeps_serving(server):
    port, url = server
    assert raw_exchange(port, b"\x16\x03\x01garbage that is not http\r\n\r\n") [:12] != b"HTTP/1.1 500"
    r = httpx.post(url + "/v2/models/affine/infer", content=b'{"inputs": [{"name": "x", "shape": [1')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = httpx.post(url + "/v2/models/affine/infer", content=b"{" + b" " * 2_100_000 + b"}")
    assert r.status_code == 413
    header = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}'
    r = httpx.post(url + "/v2/models/affine/infer", content=header + b"\0" * 16,
                   headers={"Inference-Header-Content-Length": str(len(header) + 100)})
    assert r.status_code == 400
    r = httpx.post(url + "/v2/models/affine/infer", content=header + b"\0" * 12,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]
    resp = raw_exchange(port, b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert not resp.startswith(b"HTTP/1.1 5")
    # a client that promises a body and hangs up half way
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inp")
    ok = httpx.post(url + "/v2/models/affine/infer",
                    content=orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
    assert ok.status_code == 200
    assert metric(url, "rtserve_inference_request_failure_total", model="affine", version="2", reason="backend") == 0


# -- overload, deadlines, disconnects ---------------------------------------------------------------

def test_full_queue_answers_503_at_once_and_every_request_is_answered(server):
    url = server[1]
    results: list = []
    threads = [post_in_thread(url, slow_request(), results)]
    wait_busy(url)
    threads += [post_in_thread(url, slow_request(), results) for _ in range(2)]
    end = time.time() + 5
    while metric(url, "rtserve_queue_depth", model="slow", version="1") < 2:
        assert time.time() < end
        time.sleep(0.005)
    t0 = time.perf_counter()
    body, headers = slow_request()
    r = httpx.post(url + SLOW, content=body, headers=headers, timeout=30)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 503 and r.headers["retry-after"] and "queue is full" in r.json()["error"]
    assert elapsed < 0.5
    for t in threads:
        t.join(60)
    assert sorted(s for s, _, _ in results) == [200, 200, 200]


def test_request_timeout_answers_504_before_the_busy_batch_ends(server):
    url = server[1]
    results: list = []
    busy = [post_in_thread(url, slow_request(), results), post_in_thread(url, slow_request(), results)]
    wait_busy(url)
    t0 = time.perf_counter()
    body, headers = slow_request(1, timeout=50_000)
    r = httpx.post(url + SLOW, content=body, headers=headers, timeout=30)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 504 and "timed out" in r.json()["error"]
    assert elapsed < 0.3
    for t in busy:
        t.join(60)
    assert [s for s, _, _ in results] == [200, 200]


def test_client_disconnect_cancels_a_queued_request(server):
    url, port = server[1], server[0]
    before_cancel = metric(url, "rtserve_inference_request_failure_total", model="slow", version="1", reason="cancelled")
    before_rows = metric(url, "rtserve_inference_count_total", model="slow", version="1")
    results: list = []
    busy = post_in_thread(url, slow_request(), results)
    wait_busy(url)
    body, headers = slow_request(7)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: %s\r\n"
              b"Content-Length: %d\r\n\r\n" % (headers["Inference-Header-Content-Length"].encode(), len(body)) + body)
    end = time.time() + 5
    while metric(url, "rtserve_queue_depth", model="slow", version="1") < 1:
        assert time.time() < end
        time.sleep(0.005)
    s.close()
    busy.join(60)
    end = time.time() + 5
    while metric(url, "rtserve_inference_request_failure_total", model="slow", version="1", reason="cancelled") <= before_cancel:
        assert time.time() < end, "the disconnect was not noticed"
        time.sleep(0.01)
    assert results[0][0] == 200
    # only the 64 rows of the busy request were computed, not the 7 of the cancelled one
    assert metric(url, "rtserve_inference_count_total", model="slow", version="1") - before_rows == 64


# -- metrics and the API document ---------------------------------------------------------------------

def test_metrics_and_openapi(server):
    url = server[1]
    httpx.post(url + "/v2/models/affine/infer",
               content=orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
    text = httpx.get(url + "/metrics").text
    for fam in ("rtserve_request_duration_seconds_bucket", "rtserve_batch_size_bucket",
                "rtserve_queue_duration_seconds_bucket", "rtserve_compute_duration_seconds_bucket"):
        assert re.search(rf'^{fam}\{{model="affine",version="2",le="\+Inf"\}} [1-9]', text, re.M), fam
    assert 'rtserve_queue_depth{model="affine",version="2"} 0' in text
    assert metric(url, "rtserve_inference_request_success_total", model="affine", version="2") >= 1
    assert "/v2/models/{model}/infer" in httpx.get(url + "/openapi.json").json()["paths"]


# -- separate servers --------------------------------------------------------------------------------

def test_api_key_protects_management_only(affine_repo):
    with running_server(affine_repo, env={"RTSERVE_API_KEY": "secret"}) as (_, port, url):
        assert httpx.post(url + "/v2/repository/index").status_code == 401
        assert httpx.post(url + "/v2/repository/index", headers={"Authorization": "Bearer secret"}).status_code == 200
        c = tc.InferenceServerClient(f"127.0.0.1:{port}")
        with pytest.raises(InferenceServerException) as e:
            c.unload_model("affine")
        assert e.value.status() == "401"
        c.unload_model("affine", headers={"Authorization": "Bearer secret"})
        r = httpx.post(url + "/v2/models/affine_pt2/infer",
                       content=orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
        assert r.status_code == 200


def test_sigterm_finishes_in_flight_work_then_exits(affine_repo):
    with running_server(affine_repo) as (proc, port, url):
        results: list = []
        threads = [post_in_thread(url, slow_request(), results)]
        wait_busy(url)
        threads += [post_in_thread(url, slow_request(), results) for _ in range(2)]
        end = time.time() + 5
        while metric(url, "rtserve_queue_depth", model="slow", version="1") < 2:
            assert time.time() < end
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert [s for s, _, _ in results] == [200, 200, 200]
        assert proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
