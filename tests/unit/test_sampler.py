"""The sampler on synthetic logits: exact rules and, for random draws, frequencies."""
from __future__ import annotations

import math

import pytest
import torch

from rtserve.llm.sampler import SampleRow, penalize, sample
from rtserve.llm.sampling_params import SamplingParams

PROBS = [0.7, 0.2, 0.1]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]])


def rows(params, n=1, seed=None, prompt=(), output=()):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i) if seed is not None else None
        out.append(SampleRow(params, list(prompt), list(output), g))
    return out


def draw(params, n=4000, seed=0):
    return sample(LOGITS.repeat(n, 1), rows(params, n, seed)).token_ids


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=0.01),
              SamplingParams(min_p=1.0)):
        assert sample(logits, rows(p, seed=1)).token_ids == [1], p


def test_temperature_sampling_follows_the_distribution():
    toks = draw(SamplingParams(temperature=1.0))
    freq = [toks.count(t) / len(toks) for t in range(3)]
    assert all(abs(f - p) < 0.03 for f, p in zip(freq, PROBS)), freq
    hot = draw(SamplingParams(temperature=5.0))
    assert hot.count(2) / len(hot) > 0.2  # flatter
    cold = draw(SamplingParams(temperature=0.2))
    assert cold.count(0) / len(cold) > 0.95  # sharper


def test_top_k_top_p_min_p_remove_the_tail():
    assert 2 not in draw(SamplingParams(top_k=2))
    assert 2 not in draw(SamplingParams(top_p=0.75))  # 0.7 + 0.2 reach it, 0.1 is dropped
    assert set(draw(SamplingParams(top_p=0.95))) == {0, 1, 2}
    assert 2 not in draw(SamplingParams(min_p=0.2))    # 0.1 < 0.2 * 0.7


def test_penalties():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    out = penalize(logits.clone(), rows(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[2]))
    assert out.tolist() == [[1.0, 1.0, -2.0, 0.5]]
    out = penalize(logits.clone(), rows(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                                         prompt=[3], output=[1, 1, 2]))
    assert out.tolist() == [[2.0, 1.0 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 0.5]]


def test_seed_gives_the_same_tokens_in_any_batch():
    p = SamplingParams(temperature=1.0, seed=11)
    alone = [sample(LOGITS, rows(p, seed=11)).token_ids[0] for _ in range(1)]
    g = torch.Generator().manual_seed(11)
    seq_alone = [sample(LOGITS, [SampleRow(p, [], [], g)]).token_ids[0] for _ in range(20)]
    g = torch.Generator().manual_seed(11)
    other = SamplingParams(temperature=1.0)
    seq_batched = [sample(LOGITS.repeat(3, 1), [SampleRow(other, [], []), SampleRow(p, [], [], g),
                                                SampleRow(other, [], [])]).token_ids[1] for _ in range(20)]
    assert seq_alone == seq_batched and seq_alone[0] == alone[0]
    assert len(set(seq_alone)) > 1  # it really samples


def test_logprobs_with_alternatives():
    res = sample(LOGITS, rows(SamplingParams(temperature=0, logprobs=2)))
    chosen, alts = res.logprobs[0]
    assert res.token_ids == [0] and chosen == pytest.approx(math.log(0.7), abs=1e-5)
    assert [t for t, _ in alts] == [0, 1] and alts[1][1] == pytest.approx(math.log(0.2), abs=1e-5)
    assert sample(LOGITS, rows(SamplingParams())).logprobs == [None]


@pytest.mark.parametrize("kw,needle", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"), (dict(max_tokens=-1), "max_tokens"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logprobs=50), "logprobs"), (dict(n=0), "n"),
    (dict(stop=("",)), "stop"),
    # found by the fuzz tier: these reached the engine and answered 500
    (dict(stop_token_ids=([1],)), "stop_token_ids"), (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=(True,)), "stop_token_ids"), (dict(stop_token_ids=("a",)), "stop_token_ids"),
    (dict(seed=2**64 - 1, n=2), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=1.5), "seed"),
])
def test_invalid_values_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)
