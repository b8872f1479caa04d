"""The OpenAI-compatible API end to end: the real server on loopback, the unmodified openai client."""
from __future__ import annotations

import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from servers import start_server  # noqa: E402
from models import write_text_lm  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ENGINE = "engine:\n  num_blocks: 128\n  block_size: 4\n  max_model_len: 200\n"


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("llmrepo")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        url = srv.url
        ref = LLM(repo / "lm" / "1", num_blocks=128, block_size=4, max_model_len=200)
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), ref, url


def greedy_text(ref, prompt, n=12, **kw):
    return ref.generate([prompt], SamplingParams(max_tokens=n, temperature=0, **kw))[0].outputs[0]


def test_models_and_completions(lm_server):
    client, ref, _ = lm_server
    assert [m.id for m in client.models.list().data] == ["lm"]
    r = client.completions.create(model="lm", prompt="The quick brown", max_tokens=12, temperature=0)
    want = greedy_text(ref, "The quick brown")
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(ref.encode("The quick brown"))


def test_streaming_completion_with_usage(lm_server):
    client, ref, _ = lm_server
    chunks = list(client.completions.create(model="lm", prompt="def serve(model):", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = greedy_text(ref, "def serve(model):")
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices


def test_chat_completion_plain_and_streamed(lm_server):
    client, ref, _ = lm_server
    msgs = [{"role": "user", "content": "Héllo wörld"}]
    rendered = ref.tokenizer.apply_chat_template(msgs)
    want = greedy_text(ref, rendered, n=10)
    r = client.chat.completions.create(model="lm", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    stream = client.chat.completions.create(model="lm", messages=msgs, max_tokens=10, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == want.text


def test_seed_stop_n_and_logprobs(lm_server):
    client, ref, _ = lm_server
    kw = dict(model="lm", prompt="rtserve", max_tokens=16, temperature=1.0, seed=42)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    full = greedy_text(ref, "The quick brown", n=20)
    stop = full.text[4:6]
    r = client.completions.create(model="lm", prompt="The quick brown", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full.text[:full.text.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="lm", prompt="The quick", max_tokens=5, n=3, temperature=1.0, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    r = client.completions.create(model="lm", prompt="The quick", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(v <= 0 for v in lp.token_logprobs)
    r = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2


@pytest.mark.parametrize("kw,status,needle", [
    (dict(model="nope", prompt="x"), 404, "does not exist"),
    (dict(model="lm", prompt="x", temperature=-1), 400, "temperature"),
    (dict(model="lm", prompt=""), 400, "prompt"),
    (dict(model="lm", prompt="x", max_tokens=0), 400, "max_tokens"),
    (dict(model="lm", prompt="x", top_p=2), 400, "top_p"),
    (dict(model="lm", prompt=" ".join(["snow"] * 300)), 400, "maximum context"),
    (dict(model="lm", prompt=[1, 2, 99999]), 400, "vocabulary"),
    (dict(model="lm", prompt="x", max_tokens=100_000), 400, "max_tokens asks for 100000 more"),
    (dict(model="lm", prompt="x", extra_body={"priority": "high"}), 400, "priority"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(lm_server, kw, status, needle):
    client, _, url = lm_server
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**kw)
    assert e.value.status_code == status and needle in e.value.message
    r = httpx.post(url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json() and "message" in r.json()["error"]
    assert client.completions.create(model="lm", prompt="ok", max_tokens=2).choices[0].text is not None


def test_zero_max_completion_tokens_and_stop_token_ids_outside_the_vocabulary_are_400s(lm_server):
    _, _, url = lm_server
    chat = {"model": "lm", "messages": [{"role": "user", "content": "hi"}]}
    cases = [({**chat, "max_completion_tokens": 0}, "max_completion_tokens", "must be at least 1"),
             ({**chat, "stop_token_ids": [1, 99999]}, "stop_token_ids", "vocabulary size"),
             ({"model": "lm", "prompt": "x", "stop_token_ids": [99999]}, "stop_token_ids", "vocabulary size"),
             ({"model": "lm", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", "integers >= 0")]
    for doc, param, needle in cases:
        path = "/v1/chat/completions" if "messages" in doc else "/v1/completions"
        r = httpx.post(url + path, json=doc, timeout=30)
        assert r.status_code == 400, (doc, r.text)
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"], err
    r = httpx.post(url + "/v1/completions", json={"model": "lm", "prompt": "x", "max_tokens": 2,
                                                  "stop_token_ids": [1]}, timeout=30)
    assert r.status_code == 200, r.text


def test_closing_the_stream_cancels_the_request(lm_server):
    client, _, url = lm_server
    stream = client.completions.create(model="lm", prompt="The quick", max_tokens=190, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    # the engine is free again: a short request completes promptly
    t0 = time.perf_counter()
    client.completions.create(model="lm", prompt="x", max_tokens=2)
    assert time.perf_counter() - t0 < 5


def test_llm_metrics(lm_server):
    client, _, url = lm_server
    client.completions.create(model="lm", prompt="The quick brown", max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(url + "/metrics").text

    def value(name):
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value('rtserve_llm_time_to_first_token_seconds_count{model="lm"}') >= 1
    assert value('rtserve_llm_inter_token_latency_seconds_count{model="lm"}') >= 5
    assert value('rtserve_llm_e2e_request_latency_seconds_count{model="lm"}') >= 1
    assert value('rtserve_llm_request_queue_time_seconds_count{model="lm"}') >= 1
    assert value('rtserve_llm_generation_tokens_total{model="lm"}') >= 6
    assert value('rtserve_llm_prompt_tokens_total{model="lm"}') >= 4
    assert value('rtserve_llm_prefix_cache_queries_total{model="lm"}') >= value('rtserve_llm_prefix_cache_hits_total{model="lm"}')
    assert value('rtserve_llm_request_success_total{model="lm",finished_reason="length"}') >= 1
    assert value('rtserve_llm_num_requests_running{model="lm"}') == 0
    assert value('rtserve_llm_kv_cache_usage_ratio{model="lm"}') == 0
