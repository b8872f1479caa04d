"""Tokenizer, incremental detokenization, chat templates and stop strings (no hub: the tokenizer
is trained here)."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402
from rtserve.llm.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop  # noqa: E402

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_lm(tmp_path_factory.mktemp("textlm"))


def test_encode_decode_round_trip_and_special_tokens(model_dir):
    t = Tokenizer(model_dir)
    s = "Héllo wörld ☃ ✓"
    ids = t.encode(s)
    assert ids[0] == 0 and t.decode(ids) == s and t.eos_token_id == 1
    assert t.encode(s, add_special_tokens=False) == ids[1:]


def test_incremental_deltas_never_split_a_character(model_dir):
    t = Tokenizer(model_dir)
    s = "ça va? ☃☃ Ünïcödé ✓"
    ids = t.encode(s, add_special_tokens=False)
    assert any("\ufffd" in t.decode(ids[:k]) for k in range(1, len(ids)))  # the test has split characters
    d = IncrementalDetokenizer(t)
    deltas = [d.update(ids[:k]) for k in range(1, len(ids) + 1)]
    assert "".join(deltas) == s and not any("\ufffd" in x for x in deltas)


def _trained(path, kind: str) -> Tokenizer:
    """A SentencePiece-like (Metaspace: a leading space marker the decoder strips at the start) or a
    WordPiece (``##`` joins) tokenizer, trained here: decoders that treat a text's first token apart."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    text = ["the cat sat on the mat", "ça va? ☃ très bien", "unbelievable tokenization of words"] * 20
    if kind == "metaspace":
        hf = HF(models.BPE(unk_token="<unk>"))
        hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"])
    else:
        hf = HF(models.WordPiece(unk_token="[UNK]"))
        hf.pre_tokenizer, hf.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"])
    hf.train_from_iterator(text, trainer)
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    return Tokenizer(path)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "wordpiece"])
def test_incremental_text_is_the_whole_decode(model_dir, tmp_path, kind):
    t = Tokenizer(model_dir) if kind == "bytelevel" else _trained(tmp_path / kind, kind)
    s = "the cat sat on the mat unbelievable tokenization ça va? the end"
    ids = t.encode(s, add_special_tokens=False)
    assert len(ids) > 8
    d = IncrementalDetokenizer(t)
    for k in range(1, len(ids) + 1):
        d.update(ids[:k])
        whole = t.decode(ids[:k])
        assert whole.startswith(d.text) and (whole == d.text or whole.endswith("\ufffd"))
    d.finish(ids)
    assert d.text == t.decode(ids)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "wordpiece"])
def test_an_output_reads_as_it_does_after_its_prompt(model_dir, tmp_path, kind):
    """The first output token is decoded after the prompt's last tokens: " mat", not "mat", after
    "the cat sat on the" with a SentencePiece-like or WordPiece tokenizer (as decoding it all)."""
    t = Tokenizer(model_dir) if kind == "bytelevel" else _trained(tmp_path / kind, kind)
    prompt = t.encode("the cat sat on the", add_special_tokens=False)
    out = t.encode(" mat unbelievable ça va", add_special_tokens=False)
    d = IncrementalDetokenizer(t, prompt)
    deltas = [d.update(out[:k]) for k in range(1, len(out) + 1)] + [d.finish(out)]
    whole = t.decode(prompt + out)
    assert "".join(deltas) == d.text == whole[len(t.decode(prompt)):]
    assert d.text.startswith(" mat") and len(d.context) == 5
    if kind != "bytelevel":
        assert not t.decode(out).startswith(" ")  # what decoding the output alone gave


def test_a_prompt_ending_inside_a_character_is_no_context(model_dir):
    t = Tokenizer(model_dir)
    snowman = t.encode("☃", add_special_tokens=False)
    assert len(snowman) == 3 and t.decode(snowman[:1]) == "\ufffd"  # its bytes, one token each
    d = IncrementalDetokenizer(t, t.encode("a b", add_special_tokens=False) + snowman[:1])
    assert d.context == []
    assert d.update(snowman[1:]) == "" and d.finish(snowman[1:]) == t.decode(snowman[1:])  # the rest, as it decodes


def test_find_stop():
    assert find_stop("hello world", ("wor",), 3) == 6
    assert find_stop("hello world", ("hel",), 2) == -1  # could not have been completed by the new text
    assert find_stop("abcabc", ("bc", "ca"), 6) == 1


def test_chat_template_is_rendered_in_a_sandbox(model_dir, tmp_path):
    t = Tokenizer(model_dir)
    out = t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|user|>hi</s><|assistant|>"
    t.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|access"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_text_prompts_and_stop_strings(model_dir):
    llm = LLM(model_dir, num_blocks=64, block_size=4)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = llm.generate(["The quick brown"], greedy)[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids) and len(full.text) > 6
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = llm.generate(["The quick brown"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                           stop=(stop,)))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    assert llm.scheduler.bm.num_used == 0


def test_async_engine_streams_cancels_and_stops(model_dir):
    import asyncio
    import time

    from rtserve.llm.async_engine import AsyncLLM
    from rtserve.llm.scheduler import RequestTooLarge

    llm = LLM(model_dir, num_blocks=128, block_size=4, max_model_len=200)
    prompts = ["The quick brown", "def serve(model):", "Héllo wörld", "rtserve"]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    solo = [llm.generate([p], greedy)[0].outputs[0] for p in prompts]
    engine = AsyncLLM(llm)

    async def collect(prompt, params):
        text, toks, reasons = "", [], []
        async for d in engine.generate(prompt, params):
            text += d.text
            toks += d.token_ids
            reasons.append(d.finish_reason)
        return text, toks, reasons

    async def main():
        results = await asyncio.gather(*(collect(p, greedy) for p in prompts))
        for (text, toks, reasons), ref in zip(results, solo):
            assert toks == ref.token_ids and text == ref.text
            assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])

        stop = solo[0].text[5:7]
        text, _, reasons = await collect(prompts[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                    stop=(stop,)))
        assert text == solo[0].text[:solo[0].text.index(stop)] and reasons[-1] == "stop"

        gen = engine.generate(prompts[1], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
        got = 0
        async for _ in gen:
            got += 1
            if got == 2:
                break
        await gen.aclose()
        end = time.time() + 5
        while llm.scheduler.has_work or llm.scheduler.bm.num_used:
            assert time.time() < end, "the abandoned request was not aborted"
            await asyncio.sleep(0.01)

        with pytest.raises(RequestTooLarge, match="maximum context"):
            async for _ in engine.generate(list(range(5, 250)), greedy):
                pass

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    llm.scheduler.bm.check_integrity()


def test_rtserve_generate_cli_streams_the_same_text(model_dir):
    import subprocess
    import sys

    llm = LLM(model_dir, num_blocks=64, block_size=4)
    ref = llm.generate(["The quick brown"], SamplingParams(max_tokens=12, temperature=0))
    out = subprocess.run([sys.executable, "-m", "rtserve", "generate", str(model_dir), "--prompt", "The quick brown",
                          "--max-tokens", "12"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ref[0].outputs[0].text and f"[finish: {ref[0].outputs[0].finish_reason}]" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "rtserve", "generate", str(model_dir), "--prompt", "x",
                          "--temperature", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "temperature" in bad.stderr
