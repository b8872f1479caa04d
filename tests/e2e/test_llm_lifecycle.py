"""Unload and SIGTERM give every accepted language-model request a terminal answer: the real server
on loopback, long streams running. A stream ends with a chunk whose finish_reason is "abort", an
error event in OpenAI's format, then [DONE]; a request that has not streamed gets a 503."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)
YAML = "backend: llm\ndevice: cpu\nengine:\n  num_blocks: 1024\n  block_size: 8\n  max_model_len: 2048\n"
LONG = {"model": "lm", "prompt": "The quick brown", "max_tokens": 1900, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def lm_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("lifecycle")
    write_text_lm(repo / "lm" / "1", max_position_embeddings=2048)
    (repo / "lm" / "model.yaml").write_text(YAML)
    return repo


def stream_events(url: str, started: threading.Event, out: list, i: int) -> None:
    """Read one streaming completion to its end: its data events, or the error that broke it."""
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        out[i] = events
    except httpx.HTTPError as e:
        out[i] = e


def check_terminal(events) -> dict:
    """The stream ended properly: [DONE] last; if it did not run to its length, an abort chunk and
    an error event came first. Returns the error body (or {} when it finished)."""
    assert isinstance(events, list), f"the stream broke: {events!r}"
    assert events[-1] == "[DONE]", events[-3:]
    last_chunk = json.loads(events[-3]) if len(events) >= 3 else {}
    err = json.loads(events[-2])
    if "error" not in err:
        assert err["choices"][0]["finish_reason"] == "length"
        return {}
    assert last_chunk["choices"][0]["finish_reason"] == "abort"
    return err["error"]


def run_streams(url: str, n: int):
    out, threads, started = [None] * n, [], []
    for i in range(n):
        ev = threading.Event()
        t = threading.Thread(target=stream_events, args=(url, ev, out, i), daemon=True)
        t.start()
        threads.append(t)
        started.append(ev)
    for ev in started:
        assert ev.wait(30), "a stream never started"
    return out, threads


def test_unload_ends_every_running_request_and_refuses_new_ones(lm_repo, tmp_path):
    with start_server(lm_repo, tmp_path, "--shutdown-timeout", "0.5", "--log-level", "info") as srv:
        out, threads = run_streams(srv.url, 8)
        plain: dict = {}
        t_plain = threading.Thread(target=lambda: plain.update(r=httpx.post(
            srv.url + "/v1/completions", json=LONG, timeout=60)), daemon=True)
        t_plain.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        assert httpx.post(srv.url + "/v2/repository/models/lm/unload", timeout=30).status_code == 200
        for t in threads + [t_plain]:
            t.join(30)
            assert not t.is_alive(), "a request was left hanging after the unload"
        assert time.monotonic() - t0 < 15
        errors = [check_terminal(ev) for ev in out]
        assert sum(1 for e in errors if e) >= 1  # 1,900 tokens do not finish in the 0.5 s drain
        for e in errors:
            if e:
                assert e["code"] == 503 and "stopped serving" in e["message"]
        assert plain["r"].status_code == 503 and "stopped serving" in plain["r"].json()["error"]["message"]
        after = httpx.post(srv.url + "/v1/completions", json={**LONG, "max_tokens": 4}, timeout=30)
        assert after.status_code == 503
        assert "ended with 503" in srv.log_text()


def test_sigterm_ends_every_stream_with_a_final_event_and_exits_0(lm_repo, tmp_path):
    with start_server(lm_repo, tmp_path, "--shutdown-timeout", "3", "--log-level", "info") as srv:
        out, threads = run_streams(srv.url, 6)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert srv.proc.wait(30) == 0
        for ev in out:
            err = check_terminal(ev)
            if err:
                assert err["code"] == 503
        log = srv.log_text()
        assert "CancelledError" not in log and "Traceback" not in log, log[-3000:]
