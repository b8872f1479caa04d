"""The engine in a process of its own (``engine_core: auto``, the default) behind the real server:
the OpenAI client gets the same greedy answers as from the same checkpoint on the engine thread
(``engine_core: thread``); bad requests are still 4xx; an unload answers the
running streams and stops the engine process; SIGTERM exits 0 with no engine process left."""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from models import write_text_lm  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = pytest.mark.timeout(240)
ENGINE = "engine:\n  num_blocks: 1024\n  block_size: 8\n  max_model_len: 2048\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("core_server")
    for name, extra in (("lm", "  engine_core: thread\n"), ("lmp", "")):  # lmp: auto, a process
        write_text_lm(root / name / "1", max_position_embeddings=2048)
        (root / name / "model.yaml").write_text(f"backend: llm\ndevice: cpu\n{ENGINE}{extra}")
    return root


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of ``pid``'s child processes."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:  # exited meanwhile
            continue
    return out


def engine_pids(server: int) -> list[int]:
    """Engine processes: forks of the server's fork server (``engine_core._context``)."""
    servers = [p for p, cmd in children(server) if "forkserver" in cmd]
    return [p for fs in servers for p, _ in children(fs)]


def metric(text: str, family: str, model: str) -> float:
    prefix = f'{family}{{model="{model}"}} '
    [line] = [x for x in text.splitlines() if x.startswith(prefix)]
    return float(line[len(prefix):])


def test_process_engine_behind_the_server(repo, tmp_path):
    with start_server(repo, tmp_path, "--shutdown-timeout", "0.5", "--log-level", "info") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert len(engine_pids(srv.proc.pid)) == 1  # lmp's engine process
        for kw in ({"prompt": "The quick brown", "max_tokens": 24, "temperature": 0},
                   {"prompt": "Hello there", "max_tokens": 16, "temperature": 0, "stop": [" the"]}):
            want = client.completions.create(model="lm", **kw).choices[0]
            got = client.completions.create(model="lmp", **kw).choices[0]
            assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
            for m in ("lm", "lmp"):  # to both, so that both saw the same requests (the metrics below)
                streamed = client.completions.create(model=m, stream=True, **kw)
                assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text
        chat = [{"role": "user", "content": "Say something"}]
        want = client.chat.completions.create(model="lm", messages=chat, max_tokens=12, temperature=0)
        got = client.chat.completions.create(model="lmp", messages=chat, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.completion_tokens == want.usage.completion_tokens

        scored = [client.completions.create(model=m, prompt="The quick brown", max_tokens=5, temperature=0,
                                            logprobs=2).choices[0].logprobs for m in ("lm", "lmp")]
        assert scored[1].tokens == scored[0].tokens
        assert scored[1].token_logprobs == pytest.approx(scored[0].token_logprobs, abs=1e-4)
        guided = {"prompt": "Colour:", "max_tokens": 12, "temperature": 0,
                  "extra_body": {"structured_outputs": {"regex": r"(red|green|blue)![a-z]{1,3}"}}}
        texts = [client.completions.create(model=m, **guided).choices[0].text for m in ("lm", "lmp")]
        assert texts[0] == texts[1] and re.fullmatch(r"(red|green|blue)![a-z]{1,3}", texts[1])
        bad_regex = httpx.post(srv.url + "/v1/completions", timeout=30,
                               json={"model": "lmp", "prompt": "x", "max_tokens": 4, "guided_regex": "(["})
        assert bad_regex.status_code == 400, bad_regex.text
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text  # lmp's gauges come from its engine process
        queries = {m: metric(metrics, "rtserve_llm_prefix_cache_queries_total", m) for m in ("lm", "lmp")}
        assert queries["lmp"] == queries["lm"] > 0  # the same requests went to both
        assert metric(metrics, "rtserve_llm_num_requests_running", "lmp") == 0

        engines = [httpx.get(f"{srv.url}/v2/models/{m}/config", timeout=30).json()["engine"] for m in ("lm", "lmp")]
        assert engines[0] == engines[1] and engines[1]["max_model_len"] > 0  # the engine process's limits

        too_long = httpx.post(srv.url + "/v1/completions", timeout=30,
                              json={"model": "lmp", "prompt": "a " * 2100, "max_tokens": 4})
        assert too_long.status_code == 400, too_long.text
        bad = httpx.post(srv.url + "/v1/completions", timeout=30,
                         json={"model": "lmp", "prompt": "x", "max_tokens": 4, "temperature": -1})
        assert bad.status_code == 400 and "temperature" in bad.text

        # unload with a stream running: a terminal abort chunk and a 503 error event, then [DONE]
        events: list[str] = []
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"model": "lmp", "prompt": "The", "max_tokens": 1900, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            running = metric(httpx.get(srv.url + "/metrics", timeout=30).text, "rtserve_llm_num_requests_running",
                             "lmp")
            unload = httpx.post(srv.url + "/v2/repository/models/lmp/unload", timeout=60)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert unload.status_code == 200
        assert running == 1
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 503 and "stopped serving" in err["message"]
        deadline = time.monotonic() + 10
        while engine_pids(srv.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine_pids(srv.proc.pid) == []

        assert httpx.post(srv.url + "/v2/repository/models/lmp/load", timeout=120).status_code == 200
        assert client.completions.create(model="lmp", prompt="The quick brown", max_tokens=4,
                                         temperature=0).choices[0].text
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]
