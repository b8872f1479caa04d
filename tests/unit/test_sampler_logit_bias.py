"""logit_bias in the sampler: added to the logits before the penalties and the logprobs (OpenAI's rule)."""
from __future__ import annotations

import math

import pytest
import torch

from rtserve.llm.sampler import SampleRow, sample
from rtserve.llm.sampling_params import SamplingParams

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0]])


def _one(params: SamplingParams, output=()):
    return sample(LOGITS.clone(), [SampleRow(params, [], list(output))])


def test_a_bias_of_100_makes_greedy_pick_a_token_and_minus_100_bans_one():
    assert _one(SamplingParams(temperature=0)).token_ids == [0]
    assert _one(SamplingParams(temperature=0, logit_bias=((3, 100.0),))).token_ids == [3]
    assert _one(SamplingParams(temperature=0, logit_bias=((0, -100.0),))).token_ids == [1]
    toks = sample(LOGITS.repeat(500, 1), [SampleRow(SamplingParams(temperature=1.0, logit_bias=((0, -100.0),)), [], [])
                                           for _ in range(500)]).token_ids
    assert 0 not in toks


def test_the_logprobs_are_of_the_biased_distribution_and_penalties_come_after():
    r = _one(SamplingParams(temperature=0, logprobs=1, logit_bias=((1, 1.5),)))
    biased = torch.tensor([2.0, 2.5, 0.0, -1.0])
    assert r.token_ids == [1] and math.isclose(r.logprobs[0][0], float(torch.log_softmax(biased, 0)[1]), rel_tol=1e-5)
    # presence penalty 2 on the biased token 1 (already generated): 2.5 - 2 < 2.0, token 0 wins
    r = _one(SamplingParams(temperature=0, presence_penalty=2.0, logit_bias=((1, 1.5),)), output=[1])
    assert r.token_ids == [0]


def test_rows_keep_their_own_bias():
    rows = [SampleRow(SamplingParams(temperature=0, logit_bias=((2, 50.0),)), [], []),
            SampleRow(SamplingParams(temperature=0), [], [])]
    assert sample(LOGITS.repeat(2, 1), rows).token_ids == [2, 0]


def test_an_id_past_the_logits_is_a_value_error_not_an_index_error():
    with pytest.raises(ValueError, match="vocabulary size 4"):
        _one(SamplingParams(temperature=0, logit_bias=((4, 1.0),)))
