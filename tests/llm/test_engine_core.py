"""The engine in a process of its own (``engine_core: process``): the same outputs as the engine
thread, refusals raised at the first ``__anext__``, aborts, and a terminal answer for every open
request on close and when the engine process dies. A real child process on a tiny checkpoint."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from rtserve.llm.admission import Overloaded  # noqa: E402
from rtserve.llm.async_engine import AsyncLLM, EngineClosed  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.engine_config import EngineConfig  # noqa: E402
from rtserve.llm.engine_core import ProcessAsyncLLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402
from rtserve.llm.scheduler import RequestTooLarge  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ENGINE = {"num_blocks": 128, "block_size": 4, "max_model_len": 200}
PROMPTS = [[0, 5, 6], [0, 9], [0, 17, 3, 44, 2], [0, 60, 61]]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return write_text_lm(tmp_path_factory.mktemp("core") / "lm")


@pytest.fixture(scope="module")
def core(lm_dir):
    engine = ProcessAsyncLLM(lm_dir, ENGINE)
    yield engine
    engine.close(0)


async def collect(engine, prompt, params):
    """Per choice: (token ids, text, finish reason, failure). With logprobs asked for, each choice
    has one per token (a stop string cuts both)."""
    out: dict[int, list] = {}
    lps: dict[int, int] = {}
    async for d in engine.generate(prompt, params):
        c = out.setdefault(d.index, [[], "", None, None])
        c[0] += d.token_ids
        c[1] += d.text
        lps[d.index] = lps.get(d.index, 0) + len(d.logprobs or [])
        if d.finish_reason is not None:
            c[2], c[3] = d.finish_reason, d.failure
    if params.logprobs is not None:
        assert all(lps[i] == len(out[i][0]) for i in out if out[i][3] is None), (lps, out)
    return [tuple(out[i]) for i in sorted(out)]


def run_all(engine, requests):
    async def go():
        return await asyncio.gather(*(collect(engine, p, sp) for p, sp in requests))
    return asyncio.run(go())


def test_same_outputs_as_the_engine_thread(lm_dir, core):
    requests = [(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in PROMPTS]
    requests.append(([0, 5, 6], SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2, ignore_eos=True)))
    requests.append(([0, 9], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(7,))))
    thread = AsyncLLM(LLM(lm_dir, **ENGINE))
    try:
        want = run_all(thread, requests)
    finally:
        thread.close(0)
    got = run_all(core, requests)
    assert got == want
    assert all(c[2] in ("length", "stop") and c[3] is None for r in got for c in r)
    assert len(got[4]) == 2 and all(len(c[0]) == 10 for c in got[4])
    assert os.getpid() != core.pid


def test_stop_strings_end_choices_as_with_the_engine_thread(lm_dir, core):
    """The API process makes the text (the engine process sends token ids): a stop string ends a
    choice at the same token, with the same text, as the engine thread, which detokenizes itself."""
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    thread = AsyncLLM(LLM(lm_dir, **ENGINE))
    try:
        texts = [r[0][1] for r in run_all(thread, [(p, greedy) for p in PROMPTS])]
        assert all(len(t) > 12 for t in texts)
        requests = [(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(t[9:12],)))
                    for p, t in zip(PROMPTS, texts)]
        requests.append(([0, 5, 6], SamplingParams(max_tokens=30, temperature=0.9, seed=5, n=3, ignore_eos=True,
                                                   stop=("e", "a"), logprobs=2)))
        want = run_all(thread, requests)
    finally:
        thread.close(0)
    got = run_all(core, requests)
    assert got == want
    assert all(c[2] == "stop" and len(c[1]) <= 9 for r in got[:4] for c in r)
    assert [c[1] for r in got[:4] for c in r] == [t[:t.index(t[9:12])] for t in texts]


def test_stop_strings_inside_a_proposal_are_cut_on_the_api_side(lm_dir):
    """Speculation sends several tokens a step: the API side cuts at the one that completed the stop
    string, as plain decoding stops there (tokens, text and logprobs)."""
    plain = LLM(lm_dir, **ENGINE)
    prompt = plain.encode("The quick brown fox jumps over the lazy dog. The quick brown fox")
    free = plain.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].outputs[0]
    stops = [free.text[c:c + 2] for c in range(3, min(len(free.text) - 2, 30), 3) if free.text[c:c + 2].strip()]
    assert len(stops) >= 3
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(st,), logprobs=1) for st in stops]
    want = [(o.token_ids, o.text, o.finish_reason, None) for sp in params
            for o in plain.generate([prompt], sp)[0].outputs]
    # the checkpoint as its own draft: every proposal is accepted, so each step sends 5 tokens
    engine = ProcessAsyncLLM(lm_dir, {**ENGINE, "speculative": {"method": "draft", "num_tokens": 4,
                                                                "draft": str(lm_dir)}})
    try:
        got = [r[0] for r in run_all(engine, [(prompt, sp) for sp in params])]
        drafts, proposed, accepted, _ = engine.stats.spec
        assert drafts > 0 and accepted == proposed
    finally:
        engine.close(0)
    assert got == want


def test_a_stop_string_frees_the_choice_in_the_engine(lm_dir):
    """The engine runs on past a stop string until the API process tells it: its only batch slot is
    free again for the next request (posted after that abort, so never refused)."""
    engine = ProcessAsyncLLM(lm_dir, {**ENGINE, "max_num_seqs": 1, "max_waiting": 0})
    try:
        greedy = SamplingParams(max_tokens=190, temperature=0, ignore_eos=True)
        [[(_, text, _, _)]] = run_all(engine, [([0, 5], SamplingParams(max_tokens=12, temperature=0,
                                                                        ignore_eos=True))])
        for _ in range(3):
            [[(ids, _, reason, _)]] = run_all(engine, [([0, 5], SamplingParams(
                max_tokens=190, temperature=0, ignore_eos=True, stop=(text[4:7],)))])
            assert reason == "stop" and len(ids) < 12
        [[(ids, _, reason, _)]] = run_all(engine, [([0, 9], greedy)])
        assert reason == "length" and len(ids) == 190
    finally:
        assert engine.close(0) == 0


def test_a_detokenizer_fault_fails_that_choice_only(core, monkeypatch):
    import rtserve.llm.engine_core as ec

    class Faulty(ec.ChoiceText):
        def apply(self, d):
            if "BOOM" in self.stream.stops:
                raise UnicodeError("cannot decode")
            return super().apply(d)
    monkeypatch.setattr(ec, "ChoiceText", Faulty)
    good, bad = run_all(core, [([0, 5], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)),
                               ([0, 9], SamplingParams(max_tokens=190, temperature=0, ignore_eos=True, stop=("BOOM",)))])
    assert good[0][2] == "length" and len(good[0][0]) == 150
    assert bad[0][2] == "abort" and bad[0][3].status == 500 and "UnicodeError" in bad[0][3].message
    assert core.stats.running == 0  # the engine was told to end the failed one (190 tokens) long before


def test_refusals_raise_at_the_first_item(core):
    async def first(prompt, params):
        gen = core.generate(prompt, params)
        try:
            return await gen.__anext__()
        finally:
            await gen.aclose()
    with pytest.raises(RequestTooLarge, match="200"):
        asyncio.run(first(list(range(1, 250)), SamplingParams(max_tokens=5)))
    with pytest.raises(TypeError, match="token ids"):
        asyncio.run(first("text", SamplingParams(max_tokens=5)))
    # the engine serves on
    [(ids, _, reason, failure)] = run_all(core, [([0, 5], SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True))])[0]
    assert len(ids) == 4 and reason == "length" and failure is None


def test_a_consumer_that_goes_away_is_aborted(core):
    async def go():
        gen = core.generate([0, 5, 6], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
        first = await gen.__anext__()
        await gen.aclose()  # the engine ends the sequence and frees its blocks
        return first
    first = asyncio.run(go())
    assert first.finish_reason is None
    # every block is free again: a request that needs most of the cache still runs
    [(ids, _, reason, _)] = run_all(core, [([0, 9], SamplingParams(max_tokens=180, temperature=0,
                                                                    ignore_eos=True))])[0]
    assert len(ids) == 180 and reason == "length"


def test_overloaded_is_a_refusal(lm_dir):
    engine = ProcessAsyncLLM(lm_dir, {**ENGINE, "max_num_seqs": 1, "max_waiting": 0})
    try:
        async def go():
            long = engine.generate([0, 5], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
            await long.__anext__()  # running: the only batch slot is taken
            second = engine.generate([0, 9], SamplingParams(max_tokens=4))
            with pytest.raises(Overloaded):
                await second.__anext__()
            await long.aclose()
        asyncio.run(go())
    finally:
        assert engine.close(0) == 0


def test_close_answers_open_requests_and_refuses_new_ones(lm_dir):
    engine = ProcessAsyncLLM(lm_dir, ENGINE)

    async def go():
        gen = engine.generate([0, 5], SamplingParams(max_tokens=190, temperature=0, ignore_eos=True))
        await gen.__anext__()
        left = await asyncio.to_thread(engine.close, 0.0, "unloading")
        last = [d async for d in gen][-1]
        return left, last
    left, last = asyncio.run(go())
    assert left == 1
    assert last.finish_reason == "abort" and last.failure.status == 503 and "unloading" in last.failure.message
    assert not engine._proc.is_alive()

    async def again():
        async for _ in engine.generate([0, 5], SamplingParams(max_tokens=2)):
            pass
    with pytest.raises(EngineClosed):
        asyncio.run(again())


def test_a_dead_engine_process_fails_open_requests(lm_dir):
    engine = ProcessAsyncLLM(lm_dir, ENGINE)

    async def go():
        gen = engine.generate([0, 5], SamplingParams(max_tokens=190, temperature=0, ignore_eos=True, n=2))
        await gen.__anext__()
        os.kill(engine.pid, signal.SIGKILL)
        return [d async for d in gen]
    rest = asyncio.run(asyncio.wait_for(go(), 60))
    ends = [d for d in rest if d.finish_reason is not None]
    assert sorted(d.index for d in ends) == [0, 1]
    assert all(d.failure is not None and d.failure.status == 503 for d in ends)

    async def again():
        async for _ in engine.generate([0, 5], SamplingParams(max_tokens=2)):
            pass
    with pytest.raises(EngineClosed):
        asyncio.run(again())
    engine.close(0)


def test_load_failures_and_config(tmp_path, lm_dir):
    with pytest.raises(ValueError, match="could not load"):
        ProcessAsyncLLM(tmp_path, ENGINE)  # no checkpoint there
    with pytest.raises(ValueError, match="engine_core"):
        EngineConfig.from_dict({"engine_core": "fork"})
    with pytest.raises(ValueError, match="pipeline_stages"):
        EngineConfig.from_dict({"engine_core": "process", "pipeline_stages": 2})
    assert EngineConfig.from_dict({"engine_core": "process"}).served_core == "process"
    assert EngineConfig.from_dict({}).served_core == "process"  # auto
    assert EngineConfig.from_dict({"pipeline_stages": 2}).served_core == "thread"
    assert EngineConfig.from_dict({"engine_core": "thread"}).served_core == "thread"
