"""LLM admission control and priority end to end: the real server on loopback, a tiny random Llama
with one running sequence and two waiting at most. A burst gets 429s with Retry-After at once, the
rest completes, and the server keeps serving; a waiting request with a lower priority value starts first."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest.importorskip("transformers")

from servers import start_server  # noqa: E402
from models import write_random_llama  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ENGINE = ("engine:\n  num_blocks: 512\n  block_size: 4\n  max_model_len: 1200\n  max_num_seqs: 1\n"
          "  max_waiting: 2\n")
PROMPT = [5, 17, 42, 8, 13]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    repo = tmp_path_factory.mktemp("admissionrepo")
    write_random_llama(repo / "lm" / "1", max_position_embeddings=1200)
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        yield srv.url


def body(max_tokens: int, **extra) -> dict:
    return {"model": "lm", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


async def timed_post(client: httpx.AsyncClient, doc: dict) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=doc)
    return r, time.perf_counter() - t0


async def burst(url: str, n: int, max_tokens: int) -> list[tuple[httpx.Response, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(timed_post(client, body(max_tokens)) for _ in range(n)))


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).rsplit(" ", 1)[1])


def test_a_burst_over_the_queue_limit_is_refused_at_once_and_the_rest_completes(url):
    answers = asyncio.run(burst(url, 6, 190))
    ok = [(r, t) for r, t in answers if r.status_code == 200]
    refused = [(r, t) for r, t in answers if r.status_code == 429]
    assert len(ok) + len(refused) == 6, [r.text for r, _ in answers]
    # one running and two waiting at most: the burst lands within the first request's 190 steps
    assert 2 <= len(ok) <= 3 and len(refused) >= 3
    for r, _ in ok:
        assert r.json()["usage"]["completion_tokens"] == 190
    for r, _ in refused:
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "max_waiting is 2" in err["message"]
    # refusals are answered at once, the admitted ones after their generations
    assert max(t for _, t in refused) < 1.0 and max(t for _, t in refused) < max(t for _, t in ok)
    assert metric(url, 'rtserve_llm_request_refused_total{model="lm"}') >= len(refused)
    # the server keeps serving, and every admitted sequence left the count: two at once fit again
    assert [r.status_code for r, _ in asyncio.run(burst(url, 2, 8))] == [200, 200]
    assert metric(url, 'rtserve_llm_num_requests_waiting{model="lm"}') == 0


async def queue_full(http: httpx.AsyncClient) -> None:
    """Until the server reports one sequence running and two waiting (no guess at timing)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = (await http.get("/metrics")).text
        values = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                  if ln.startswith(("rtserve_llm_num_requests_running{", "rtserve_llm_num_requests_waiting{"))
                  and 'model="lm"' in ln}
        if values == {"rtserve_llm_num_requests_running": 1.0, "rtserve_llm_num_requests_waiting": 2.0}:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the queue never filled")


def test_the_openai_client_sees_a_rate_limit_error(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    async def fill_and_ask():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            # long enough that the running one is still running when the fourth arrives
            busy = [asyncio.create_task(timed_post(http, body(1000))) for _ in range(3)]
            try:
                await queue_full(http)  # one running, two waiting: the next one is refused
                with pytest.raises(openai.RateLimitError) as e:
                    await asyncio.to_thread(client.completions.create, model="lm", prompt=PROMPT, max_tokens=4)
                return e.value
            finally:
                assert [r.status_code for r, _ in await asyncio.gather(*busy)] == [200, 200, 200]

    err = asyncio.run(fill_and_ask())
    assert err.status_code == 429 and err.response.headers["retry-after"] == "1"


def test_a_lower_priority_value_starts_first(url):
    async def race():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            done: list[str] = []

            async def send(name: str, doc: dict):
                r = await client.post("/v1/completions", json=doc)
                assert r.status_code == 200, r.text
                done.append(name)

            async with client.stream("POST", "/v1/completions", json=body(190, stream=True)) as long:
                lines = long.aiter_lines()
                await anext(lines)  # the long request runs: the next two wait for its one slot
                late = asyncio.create_task(send("late", body(4, priority=10)))
                await asyncio.sleep(0.02)
                urgent = asyncio.create_task(send("urgent", body(4, priority=-10)))
                async for _ in lines:
                    pass
            await asyncio.gather(late, urgent)
            return done

    assert asyncio.run(race()) == ["urgent", "late"]


@pytest.mark.parametrize("value", ["high", 1.5, True])
def test_priority_must_be_an_integer(url, value):
    r = httpx.post(url + "/v1/completions", json=body(2, priority=value))
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
