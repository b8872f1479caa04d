"""A choice's text (``output_text``): stop strings end it at the token that completed them, however
its tokens arrive (one at a time, or several at once: speculation, an engine process ahead of the API
process); characters are held back while a stop string may be forming; a partial character never
shows. Milliseconds, on the test tokenizer (trained here)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from models import write_text_lm  # noqa: E402
from rtserve.llm.async_engine import StreamDelta  # noqa: E402
from rtserve.llm.output_text import ChoiceText, TextStream  # noqa: E402
from rtserve.llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "the cat sat on the mat. ça va? ☃ the end"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return write_text_lm(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tok(lm_dir):
    return Tokenizer(lm_dir)


def engine_delta(ids, done=False, logprobs=None):
    """What the engine process sends: token ids, no text."""
    return StreamDelta(0, "", list(ids), logprobs, "length" if done else None, 3, 0)


def feed(choice: ChoiceText, ids: list[int], chunk: int):
    """Send ``ids`` in deltas of ``chunk`` tokens (the last one final) until the choice ends."""
    out = []
    for k in range(0, len(ids), chunk):
        part = ids[k:k + chunk]
        d = choice.apply(engine_delta(part, k + chunk >= len(ids), [-0.5] * len(part)))
        out.append(d)
        if d.finish_reason is not None:
            break
    return out


def joined(deltas):
    return ("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
            [lp for d in deltas for lp in d.logprobs], deltas[-1].finish_reason)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
def test_a_stop_string_ends_the_choice_at_the_token_that_completed_it(tok, chunk):
    ids = tok.encode(TEXT, add_special_tokens=False)
    stop = "sat on"
    # the first token after which the text contains the stop string
    first = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
    text, tokens, lps, reason = joined(feed(ChoiceText(tok, (stop,)), ids, chunk))
    assert reason == "stop" and text == "the cat " and tokens == ids[:first] and len(lps) == first


@pytest.mark.parametrize("chunk", [1, 4])
def test_no_stop_string_gives_the_whole_text_without_a_partial_character(tok, chunk):
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas = feed(ChoiceText(tok, ("never there",)), ids, chunk)
    text, tokens, _, reason = joined(deltas)
    assert text == TEXT and tokens == ids and reason == "length"
    assert not any("\ufffd" in d.text for d in deltas)


def test_characters_are_held_back_while_a_stop_string_may_form(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    choice = ChoiceText(tok, ("xyzzy",))  # 4 characters held back until the end
    sent, whole = "", ""  # whole: the text of the longest prefix that ends on a whole character
    for k, t in enumerate(ids[:-1]):
        sent += choice.apply(engine_delta([t])).text
        shown = tok.decode(ids[:k + 1])
        whole = whole if shown.endswith("\ufffd") else shown
        assert whole.startswith(sent) and len(whole) - len(sent) == min(4, len(whole))
    sent += choice.apply(engine_delta(ids[-1:], done=True)).text
    assert sent == TEXT


def test_the_last_token_completing_a_stop_string_is_a_stop(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    text, tokens, _, reason = joined(feed(ChoiceText(tok, ("the end",)), ids, 1))
    assert reason == "stop" and text == TEXT[:-len("the end")] and tokens == ids


def test_after_a_stop_the_text_no_longer_grows(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tok, ("cat",))
    keep = stream.update(ids, len(ids), False)
    assert keep is not None and stream.text == "the " and stream.stopped
    assert stream.update(ids + ids, len(ids), True) is None and stream.text == "the "


def test_the_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    text, _, _, reason = joined(feed(ChoiceText(tok, ("mat", "on the")), ids, 100))
    assert reason == "stop" and text == "the cat sat "


def test_without_a_tokenizer_deltas_pass_through():
    d = ChoiceText(None, ("x",)).apply(engine_delta([5, 6], done=True))
    assert d.text == "" and d.token_ids == [5, 6] and d.finish_reason == "length"


def test_both_sides_decode_the_first_token_after_the_prompt(tok, lm_dir):
    """The API side (``ChoiceText``) and the engine (``LLM``) give the detokenizer the prompt's last
    tokens as context (tests/llm/test_tokenizer_and_text.py: what that changes)."""
    from rtserve.llm.engine import LLM
    from rtserve.llm.sampling_params import SamplingParams

    prompt = tok.encode("the cat sat on the mat", add_special_tokens=False)
    assert ChoiceText(tok, (), prompt).stream.detok.context == prompt[-5:]
    llm = LLM(lm_dir, num_blocks=16, block_size=4)
    [seq] = llm.make_sequences(prompt, SamplingParams(max_tokens=2))
    assert llm._detok[seq.seq_id].detok.context == prompt[-5:]
