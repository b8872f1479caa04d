"""No request field is silently ignored, end to end: the real server on loopback and real clients
(``openai``, ``langchain-openai``, ``instructor``). Every request body a client sends by default is
recorded: each of its fields must be in rtserve's table (``openai_fields``) and none may be refused.
Refused and unknown fields reach the SDK as ``BadRequestError`` with ``param`` set; ``logit_bias``
changes the engine's greedy output."""
from __future__ import annotations

import httpx
import orjson
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402
from rtserve.server.protocols import openai_fields as of  # noqa: E402
from servers import start_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ENGINE = "engine:\n  num_blocks: 600\n  block_size: 4\n  max_model_len: 1000\n"  # instructor's JSON prompts are long
MSGS = [{"role": "user", "content": "The quick brown"}]


class Recorder:
    """httpx event hooks: every request body and response status a client sends and gets."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.statuses: list[int] = []

    def client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self._request], "response": [self._response]}, timeout=60)

    def _request(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.sent.append((request.url.path, orjson.loads(request.read())))

    def _response(self, response: httpx.Response) -> None:
        self.statuses.append(response.status_code)

    def check(self) -> set[str]:
        """The fields sent; each in the table of its endpoint, and every answer a 200."""
        names = set()
        for path, body in self.sent:
            endpoint = {p: e for e, p in of.PATHS.items()}[path]
            assert set(body) <= set(of.fields(endpoint)), (path, set(body) - set(of.fields(endpoint)))
            names |= set(body)
        assert self.sent and all(s == 200 for s in self.statuses), self.statuses
        return names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("llmrepo")
    write_text_lm(repo / "lm" / "1", max_position_embeddings=1024)
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\n" + ENGINE)
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        yield srv.url, LLM(repo / "lm" / "1", num_blocks=600, block_size=4, max_model_len=1000)


def _sdk(url: str, rec: Recorder | None = None):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                         http_client=rec.client() if rec else None)


@pytest.mark.parametrize("kw,param", [
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"store": True}, "store"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"stream_options": {"include_usage": True, "usage_every_chunk": True}, "stream": True}, "stream_options"),
])
def test_refused_fields_are_bad_requests_naming_them(server, kw, param):
    url, _ = server
    client = _sdk(url)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "lm", "messages": MSGS, "max_tokens": 4, **kw})
    assert e.value.param == param and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lm", prompt="x", max_tokens=4, suffix="end")
    assert e.value.param == "suffix" and "fill-in-the-middle" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="lm", input="x", extra_body={"temperature": 0})
    assert e.value.param == "temperature"


def test_echo_scoring_with_the_sdk(server):
    """The openai SDK's echo + logprobs + max_tokens 0 (what lm-eval's API models send), two prompts."""
    url, _ = server
    r = _sdk(url).completions.create(model="lm", prompt=["The quick brown", "def serve(model):"], max_tokens=0,
                                     echo=True, logprobs=1, temperature=0)
    assert [c.text for c in r.choices] == ["The quick brown", "def serve(model):"]
    for c in r.choices:
        assert c.finish_reason == "length" and c.logprobs.token_logprobs[0] is None
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:]) and c.logprobs.text_offset[0] == 0
    assert r.usage.completion_tokens == 0


def test_logit_bias_changes_greedy_output(server):
    url, ref = server
    prompt = ref.encode("The quick brown")
    plain = ref.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].token_ids
    forced = next(t for t in range(2, 50) if t not in plain)
    biased = ref.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                   logit_bias=((forced, 100.0),)))[0].outputs[0]
    assert biased.token_ids == [forced] * 6  # the engine: +100 makes greedy pick it every step
    banned = ref.generate([prompt], SamplingParams(max_tokens=6, temperature=0,
                                                   logit_bias=((plain[0], -100.0),)))[0].outputs[0]
    assert plain[0] not in banned.token_ids
    client = _sdk(url)
    r = client.completions.create(model="lm", prompt=prompt, max_tokens=6, temperature=0,
                                  logit_bias={str(plain[0]): -100})
    assert r.choices[0].text == banned.text  # the server passes it through
    r = client.chat.completions.create(model="lm", messages=MSGS, max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref.tokenizer.decode([forced] * 3)


def test_best_of_returns_the_best_of_the_choices_it_generated(server):
    url, _ = server
    client = _sdk(url)
    kw = dict(model="lm", prompt="The quick brown", max_tokens=6, temperature=1.0, seed=7)
    every = client.completions.create(n=3, logprobs=0, **kw)  # the same three draws: seeds 7, 8, 9

    def mean(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    ranked = sorted(every.choices, key=lambda c: (-mean(c), c.index))
    best = client.completions.create(n=2, best_of=3, **kw)
    assert [(c.index, c.text, c.logprobs) for c in best.choices] == [(0, ranked[0].text, None),
                                                                      (1, ranked[1].text, None)]
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all three were generated
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(n=1, best_of=2, stream=True, **kw)
    assert e.value.param == "best_of"


def test_the_openai_sdk_defaults_and_no_effect_fields_are_taken(server):
    url, _ = server
    rec = Recorder()
    client = _sdk(url, rec)
    client.chat.completions.create(model="lm", messages=MSGS, max_completion_tokens=4, n=1, store=False,
                                   user="u-1", safety_identifier="s", metadata={"k": "v"}, service_tier="auto",
                                   modalities=["text"], prompt_cache_key="k")
    list(client.chat.completions.create(model="lm", messages=MSGS, max_tokens=4, stream=True,
                                        stream_options={"include_usage": True}))
    client.completions.create(model="lm", prompt="x", max_tokens=4, echo=False, best_of=1, suffix="", user="u")
    rec.check()


def test_langchain_openai_defaults_are_taken(server):
    lc = pytest.importorskip("langchain_openai")
    url, _ = server
    rec = Recorder()
    llm = lc.ChatOpenAI(model="lm", base_url=url + "/v1", api_key="unused", max_retries=0, max_tokens=4,
                        temperature=0, http_client=rec.client())
    assert isinstance(llm.invoke("The quick brown").content, str)
    assert "".join(c.content for c in llm.stream("The quick")) is not None
    llm_usage = lc.ChatOpenAI(model="lm", base_url=url + "/v1", api_key="unused", max_retries=0, max_tokens=4,
                              stream_usage=True, http_client=rec.client())
    chunks = list(llm_usage.stream("hi"))
    assert any(getattr(c, "usage_metadata", None) for c in chunks)
    sent = rec.check()
    assert {"model", "messages", "stream"} <= sent


def test_instructor_defaults_are_taken(server):
    instructor = pytest.importorskip("instructor")
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    url, _ = server
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON):
        rec = Recorder()
        client = instructor.from_openai(_sdk(url, rec), mode=mode)
        try:  # a tiny random model rarely answers in the schema: only the server's answers matter here
            client.chat.completions.create(model="lm", response_model=City, messages=MSGS, max_tokens=8,
                                           max_retries=1)
        except Exception as e:  # noqa: BLE001
            assert not isinstance(e, openai.APIStatusError), e
            assert "400" not in str(e), e
        rec.check()
