"""Scoring through the OpenAI API, in process: echo, prompt logprobs (OpenAI's and vLLM's shapes),
several prompts per request, max_tokens 0, text_offset, cached tokens, continuous usage, and the 400s."""
from __future__ import annotations

import orjson
import pytest

pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from servers import serve_in_process  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ENGINE = "engine:\n  num_blocks: 128\n  block_size: 4\n  max_model_len: 200\n"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("scoring")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    ref = LLM(repo / "lm" / "1", num_blocks=128, block_size=4, max_model_len=200)
    return repo, ref


def run(repo, fn):
    return serve_in_process(repo, fn)


async def post(c, body: dict, path="/v1/completions"):
    r = await c.post(path, json={"model": "lm", **body})
    return r.status_code, orjson.loads(r.content) if r.headers.get("content-type", "").startswith("application/json") \
        else r.text


def test_echo_scores_the_prompt_like_the_engine(repo):
    path, ref = repo
    ids = ref.encode(PROMPT)
    want = ref.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))[0].prompt_logprobs
    gen = ref.generate([ids], SamplingParams(max_tokens=3, temperature=0, logprobs=2))[0].outputs[0]

    async def fn(c):
        return [await post(c, {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 2}),
                await post(c, {"prompt": ids, "echo": True, "max_tokens": 3, "temperature": 0, "logprobs": 2}),
                await post(c, {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 1}),
                await post(c, {"prompt": PROMPT, "echo": True, "max_tokens": 2, "temperature": 0})]

    (s0, score), (s1, both), (s2, plain), (s3, text_only) = run(path, fn)
    assert (s0, s1, s2, s3) == (200, 200, 200, 200)
    c = score["choices"][0]
    assert c["text"] == PROMPT and c["finish_reason"] == "length" and score["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    for got, w in zip(lp["token_logprobs"][1:], want[1:]):
        assert abs(got - w.logprob) < 1e-5
    assert all(len(t) <= 2 and abs(max(t.values()) - w.top[0][1]) < 1e-5 for t, w in zip(lp["top_logprobs"][1:], want[1:]))
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    c = both["choices"][0]  # token-id prompt: the prompt decoded, then the completion
    assert c["text"] == ref.tokenizer.decode(ids) + gen.text
    assert len(c["logprobs"]["tokens"]) == len(ids) + 3
    assert c["logprobs"]["token_logprobs"][len(ids):] == pytest.approx([x[0] for x in gen.logprobs], abs=1e-5)
    p = plain["choices"][0]["logprobs"]  # text_offset of a plain completion: into its text
    assert p["text_offset"][0] == 0 and p["text_offset"] == sorted(p["text_offset"]) and len(p["tokens"]) == 3
    assert text_only["choices"][0]["text"].startswith(PROMPT) and text_only["choices"][0]["logprobs"] is None


def test_several_prompts_and_vllm_prompt_logprobs(repo):
    path, ref = repo
    prompts = ["The quick brown fox", "def serve(model):", "rtserve batches"]
    want = [ref.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs for p in prompts]

    async def fn(c):
        many = await post(c, {"prompt": prompts, "n": 2, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 1})
        ids = await post(c, {"prompt": [ref.encode(p) for p in prompts[:2]], "echo": True, "max_tokens": 0})
        chat = await post(c, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "prompt_logprobs": 0}, "/v1/chat/completions")
        return many, ids, chat

    (s, many), (s2, ids), (s3, chat) = run(path, fn)
    assert (s, s2, s3) == (200, 200, 200)
    assert [c["index"] for c in many["choices"]] == list(range(6))
    assert many["usage"]["prompt_tokens"] == sum(len(ref.encode(p)) for p in prompts)
    for c in many["choices"]:
        w = want[c["index"] // 2]
        pl = c["prompt_logprobs"]
        assert pl[0] is None and len(pl) == len(w)
        for got, e in zip(pl[1:], w[1:]):
            tok = got[str(e.token)]
            assert abs(tok["logprob"] - e.logprob) < 1e-5 and tok["rank"] == e.rank
            assert len(got) <= 2 and any(v["rank"] == 1 for v in got.values())
    assert [c["text"] for c in ids["choices"]] == [ref.tokenizer.decode(ref.encode(p)) for p in prompts[:2]]
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_streamed_echo_continuous_usage_and_cached_tokens(repo):
    path, ref = repo
    long = "rtserve batches requests in real time. def serve(model): return model.infer(batch)"

    async def fn(c):
        r = await c.post("/v1/completions", json={
            "model": "lm", "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        first = await post(c, {"prompt": long, "max_tokens": 1})
        again = await post(c, {"prompt": long, "max_tokens": 1})
        chat = await c.post("/v1/chat/completions", json={
            "model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
            "prompt_logprobs": 1})
        return r.text, first[1], again[1], chat.text

    text, first, again, chat = run(path, fn)
    chat_chunks = [orjson.loads(line[6:]) for line in chat.split("\n") if line.startswith("data: {")]
    scored = [c["prompt_logprobs"] for c in chat_chunks if "prompt_logprobs" in c]
    assert len(scored) == 1 and scored[0][0] is None and len(scored[0]) > 3
    chunks = [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    body = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert body.startswith(PROMPT) and len(chunks[0]["choices"][0]["logprobs"]["tokens"]) >= len(ref.encode(PROMPT))
    assert all(c["usage"] is not None for c in chunks)
    offs = [o for c in chunks if c["choices"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offs == sorted(offs) and offs[0] == 0
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and not chunks[-1]["choices"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * (len(ref.encode(long)) // 4 - 1)


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "maximum is 20"),
    ({"prompt": "x", "prompt_logprobs": 25}, "prompt_logprobs", "maximum is 20"),
    ({"prompt": ["ok", ""]}, "prompt", "prompt[1]"),
    ({"prompt": [[1, 2], [3, -1]]}, "prompt", "prompt[1]"),
    ({"prompt": ["ok", [1, 2], 5]}, "prompt", "prompt[2]"),
    ({"prompt": ["ok", [1, 99999]]}, "prompt", "prompt[1]"),
    ({"prompt": "x", "echo": "yes"}, "echo", "boolean"),
])
def test_bad_scoring_requests_are_400s_naming_the_field_and_queue_nothing(repo, body, param, words):
    path, _ = repo

    async def fn(c):
        status, doc = await post(c, body)
        models = (await c.get("/v2/models/lm/stats")).status_code  # noqa: F841 - the server is still up
        return status, doc

    status, doc = run(path, fn)
    assert status == 400 and doc["error"]["param"] == param and words in doc["error"]["message"], doc
