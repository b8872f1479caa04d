"""Faults stay inside the request they belong to: injected into a real engine on a tiny checkpoint.

A fault while handling one sequence (its logits row, its sampling, its detokenizing) fails that
request with a message and the step goes on for the others; a failed forward pass fails only that
step's sequences (logged with its traceback); the engine keeps serving afterwards; closing the
engine gives every open request a terminal answer."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from rtserve.llm import engine as engine_mod  # noqa: E402
from rtserve.llm.async_engine import AsyncLLM, EngineClosed  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(120)
POISON = [0, 7, 7, 7]  # a prompt no other test request uses


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return write_text_lm(tmp_path_factory.mktemp("faults") / "lm")


def make(lm_dir) -> LLM:
    return LLM(lm_dir, num_blocks=128, block_size=4, max_model_len=200)


async def collect(engine: AsyncLLM, prompt, max_tokens=8):
    deltas = [d async for d in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                      ignore_eos=True))]
    return deltas[-1], sum(len(d.token_ids) for d in deltas)


def run_three(lm_dir, patch):
    """Two good requests and the poisoned one, in the same steps; the fault hits only the poison."""
    llm = make(lm_dir)
    patch(llm)
    engine = AsyncLLM(llm)

    async def go():
        return await asyncio.gather(collect(engine, [0, 5, 6]), collect(engine, POISON), collect(engine, [0, 9]))
    try:
        return asyncio.run(go()), engine
    finally:
        engine.close(0)


def test_a_nan_logits_row_fails_its_request_only(lm_dir):
    def patch(llm):
        run = llm.runner.run

        def nan_for_poison(out):
            logits = run(out).clone()
            for i, s in enumerate(out.to_sample):
                if s.token_ids[:4] == POISON:
                    logits[i] = float("nan")
            return logits
        llm.runner.run = nan_for_poison

    (good1, poisoned, good2), _ = run_three(lm_dir, patch)
    assert good1[0].failure is None and good1[1] == 8 and good1[0].finish_reason == "length"
    assert good2[0].failure is None and good2[1] == 8
    assert poisoned[0].finish_reason == "abort"
    assert poisoned[0].failure.status == 500 and "NaN" in poisoned[0].failure.message


def test_a_sampling_fault_in_one_row_fails_that_request_only(lm_dir, monkeypatch):
    real = engine_mod.sample

    def picky(logits, rows):
        if any(r.prompt_ids[:4] == POISON for r in rows):
            raise RuntimeError("bad row")
        return real(logits, rows)
    monkeypatch.setattr(engine_mod, "sample", picky)
    (good1, poisoned, good2), _ = run_three(lm_dir, lambda llm: None)
    assert good1[1] == 8 and good2[1] == 8 and good1[0].failure is None and good2[0].failure is None
    assert poisoned[0].failure.status == 500 and "sampling failed: RuntimeError: bad row" in poisoned[0].failure.message


def test_a_detokenizer_fault_fails_that_request_only(lm_dir):
    def patch(llm):
        make_seqs = llm.make_sequences

        def wrapped(prompt, params):
            seqs = make_seqs(prompt, params)
            if prompt[:4] == POISON:
                def boom(ids):
                    raise UnicodeError("cannot decode")
                llm._detok[seqs[0].seq_id].detok.update = boom  # its IncrementalDetokenizer
            return seqs
        llm.make_sequences = wrapped

    (good1, poisoned, good2), _ = run_three(lm_dir, patch)
    assert good1[1] == 8 and good2[1] == 8
    assert "detokenizing the output failed: UnicodeError" in poisoned[0].failure.message


def test_a_failed_forward_fails_its_step_is_logged_and_the_engine_serves_on(lm_dir, caplog):
    llm = make(lm_dir)
    run = llm.runner.run
    calls = {"n": 0}

    def fails_once(out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise IndexError("index 16 is out of bounds for dimension 0 with size 16")
        return run(out)
    llm.runner.run = fails_once
    engine = AsyncLLM(llm)
    try:
        with caplog.at_level(logging.ERROR, logger="rtserve.llm"):
            last, _ = asyncio.run(collect(engine, [0, 5, 6]))
        assert last.finish_reason == "abort" and last.failure.status == 500
        assert "forward pass failed: IndexError: index 16" in last.failure.message
        assert any("forward pass failed" in r.message and r.exc_info for r in caplog.records)
        again, n = asyncio.run(collect(engine, [0, 5, 6]))  # the engine goes on
        assert again.failure is None and n == 8
        llm.scheduler.bm.check_integrity()
        assert llm.scheduler.bm.num_used == 0
    finally:
        engine.close(0)


def test_close_finishes_or_fails_every_open_request_and_refuses_new_ones(lm_dir):
    llm = make(lm_dir)
    run = llm.runner.run

    def slow(out):  # 150 steps take at least 1.5 s: none can finish in the 0.3 + 0.2 s before close ends it
        time.sleep(0.01)
        return run(out)
    llm.runner.run = slow
    engine = AsyncLLM(llm)

    async def go():
        tasks = [asyncio.ensure_future(collect(engine, [0, 5 + i], max_tokens=150)) for i in range(4)]
        await asyncio.sleep(0.3)
        closing = asyncio.ensure_future(asyncio.to_thread(engine.close, 0.2, "model 'lm' was unloaded"))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        failed = await closing
        with pytest.raises(EngineClosed):
            await collect(engine, [0, 5])
        return results, failed

    results, failed = asyncio.run(go())
    assert failed == 4
    for last, _ in results:
        assert last.finish_reason == "abort" and last.failure.status == 503
        assert "unloaded" in last.failure.message
    assert llm.scheduler.bm.num_used == 0
