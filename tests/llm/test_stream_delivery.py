"""Engine output to the event loop (llm/stream_delivery.py): one pending loop callback per outbox,
a mailbox that hands over everything waiting, and deltas of a slow consumer coalesced into one
chunk per choice -- with the same text, tokens and logprobs, and an OpenAI stream shape the
``openai`` client's types accept."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from rtserve.llm.async_engine import StreamDelta
from rtserve.llm.stream_delivery import Mailbox, Outbox, coalesce

pytestmark = pytest.mark.timeout(120)


def d(index: int, text: str, toks: list[int], lps=None, finish=None, **kw) -> StreamDelta:
    return StreamDelta(index, text, toks, lps, finish, 3, len(toks), **kw)


def test_coalesce_merges_each_choice_in_order():
    lp = lambda v: (v, [(1, v)])  # noqa: E731 - (logprob, top alternatives) as the engine sends them
    got = coalesce([d(0, "a", [1], [lp(-1.0)], queue_s=0.5, prompt_logprobs=[None]), d(1, "x", [7], [lp(-2.0)]),
                    d(0, "b", [2], [lp(-3.0)]), d(0, "", [3], [lp(-4.0)], "length", num_cached_tokens=4)])
    assert [g.index for g in got] == [0, 1]
    a = got[0]
    assert (a.text, a.token_ids, a.finish_reason, a.queue_s, a.num_cached_tokens) == ("ab", [1, 2, 3], "length", 0.5, 4)
    assert a.logprobs == [lp(-1.0), lp(-3.0), lp(-4.0)] and a.prompt_logprobs == [None]
    assert got[1].text == "x" and got[1].logprobs == [lp(-2.0)]
    one = [d(0, "z", [5])]
    assert coalesce(one) is one


def test_outbox_wakes_the_loop_once_until_it_flushes_and_the_mailbox_hands_over_all():
    async def main():
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            nonlocal calls
            calls += 1
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        out, box = Outbox(loop), Mailbox()
        for i in range(5):  # five steps while the loop is busy: one callback carries them all
            out.push([(box, d(0, str(i), [i]))])
        assert calls == 1
        got = await box.take()
        assert [x.text for x in got] == ["0", "1", "2", "3", "4"]
        out.push([(box, d(0, "5", [5]))])  # flushed: the next push wakes the loop again
        assert calls == 2 and [x.text for x in await box.take()] == ["5"]

    asyncio.run(main())


def test_a_slow_consumer_gets_fewer_larger_deltas_with_the_same_output():
    pytest.importorskip("transformers")
    from models import write_text_lm
    from rtserve.llm.async_engine import AsyncLLM
    from rtserve.llm.engine import LLM
    from rtserve.llm.sampling_params import SamplingParams

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(write_text_lm(Path(tmp) / "lm"), num_blocks=128, block_size=4, max_model_len=200)
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
        ref = llm.generate(["def serve"], params)[0].outputs[0]
        engine = AsyncLLM(llm)

        async def slow():
            deltas = []
            async for x in engine.generate("def serve", params):
                deltas.append(x)
                time.sleep(0.05)  # blocks the loop: the engine runs on, its deltas wait in the outbox
            return deltas

        try:
            deltas = asyncio.run(slow())
        finally:
            engine.shutdown()
    assert "".join(x.text for x in deltas) == ref.text
    assert [t for x in deltas for t in x.token_ids] == ref.token_ids
    assert [lp for x in deltas for lp in x.logprobs] == ref.logprobs
    assert all(len(x.logprobs) == len(x.token_ids) for x in deltas)
    assert len(deltas) < 24 and max(len(x.token_ids) for x in deltas) > 1, [len(x.token_ids) for x in deltas]
    assert [x.finish_reason for x in deltas][-1] == "length"


@pytest.mark.parametrize("chat", [False, True])
def test_a_coalesced_chunk_is_a_valid_openai_chunk(chat):
    openai = pytest.importorskip("openai")
    from rtserve.server.protocols import openai as oai

    body = {"model": "m", "stream": True, "logprobs": True, "top_logprobs": 1} if chat else \
        {"model": "m", "stream": True, "prompt": "x", "logprobs": 1}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    req = oai.parse(orjson.dumps(body), chat)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    b = oai.ResponseBuilder(req, Tok())
    lps = [(-0.5, [(1, -0.5)]), (-0.25, [(2, -0.25)]), (-1.0, [(3, -1.0)])]
    merged = coalesce([d(0, "b", [1], lps[:1]), d(0, "cd", [2, 3], lps[1:], "length")])[0]
    raw = b.chunk(0, merged.text, merged.token_ids, merged.logprobs, merged.finish_reason, True)
    doc = orjson.loads(raw[len(b"data: "):])
    if chat:
        chunk = openai.types.chat.ChatCompletionChunk.model_validate(doc)
        c = chunk.choices[0]
        assert c.delta.content == "bcd" and [x.logprob for x in c.logprobs.content] == [-0.5, -0.25, -1.0]
    else:
        chunk = openai.types.Completion.model_validate(doc)
        c = chunk.choices[0]
        assert c.text == "bcd" and c.logprobs.token_logprobs == [-0.5, -0.25, -1.0]
        assert c.logprobs.text_offset == [0, 1, 2]
    assert c.finish_reason == "length"


def test_an_outbox_whose_loop_closed_drops_its_deltas_without_raising():
    loop = asyncio.new_event_loop()
    out = Outbox(loop)
    loop.close()
    out.push([(Mailbox(), d(0, "a", [1]))])  # the engine thread must go on: nobody is listening
    out.push([(Mailbox(), d(0, "b", [2]))])
    assert out._items == [] and not out._scheduled
