"""Pipeline parallelism: the decoder's layers in 2 worker processes, each with the KV cache of its
own layers; greedy outputs identical to the unsplit engine, with ragged, chunked and mixed steps."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from models import write_random_llama  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4")
    write_random_llama(path, num_hidden_layers=4, tie_word_embeddings=True)
    return path


def test_two_stage_processes_generate_what_the_whole_model_does(checkpoint):
    prompts = [[3, 9, 27], list(range(10, 47)), [1], list(range(60, 80)), [42] * 11]
    whole = LLM(checkpoint, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    expected = whole.generate_greedy(prompts, max_tokens=8)
    split = LLM(checkpoint, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                pipeline_stages=2)
    try:
        runner = split.runner
        assert runner.layer_bounds == [(0, 2), (2, 4)] and all(s.proc.is_alive() for s in runner.stages)
        assert split.generate_greedy(prompts, max_tokens=8) == expected
        assert split.generate_greedy(prompts, max_tokens=8) == expected  # again: prefix-cache hits
        assert split.scheduler.bm.num_prefix_hits > 0
    finally:
        split.runner.close()


@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batched_steps_generate_the_same(checkpoint, micro):
    """Each step cut into groups that flow through the stages one behind the other."""
    prompts = [[3, 9, 27], list(range(10, 47)), [1], list(range(60, 80)), [42] * 11]
    whole = LLM(checkpoint, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    expected = whole.generate_greedy(prompts, max_tokens=8)
    split = LLM(checkpoint, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                pipeline_stages=2, pipeline_micro_batches=micro)
    split.runner.min_group_tokens = 1  # this tiny test's steps are short: cut them anyway
    parts = []
    real_split = split.runner.split
    split.runner.split = lambda out: parts.append(len(real_split(out))) or real_split(out)
    try:
        assert split.generate_greedy(prompts, max_tokens=8) == expected
        assert max(parts) == micro and min(parts) == 1  # a lone sequence is one group
    finally:
        split.runner.close()


def test_split_groups_are_contiguous_and_balanced_by_tokens(checkpoint):
    from rtserve.llm.scheduler import ScheduledSeq, SchedulerOutput
    from rtserve.llm.sequence import Sequence

    split = LLM(checkpoint, num_blocks=16, block_size=4, pipeline_stages=2, pipeline_micro_batches=2)
    try:
        out = SchedulerOutput([ScheduledSeq(Sequence([1] * n, 1), n) for n in [8, 1, 1, 1, 5]])  # split() reads num_tokens
        assert len(split.runner.split(out)) == 1  # 16 tokens: groups would be under MIN_GROUP_TOKENS
        split.runner.min_group_tokens = 4
        groups = split.runner.split(out)
        assert [len(g.scheduled) for g in groups] == [1, 4]
        assert [x for g in groups for x in g.scheduled] == out.scheduled
        out.scheduled[4].seq.prompt_logprobs = 1  # a scored prompt: its rows follow the step's sampling rows
        assert len(split.runner.split(out)) == 1
    finally:
        split.runner.close()


def test_bad_stage_counts(checkpoint):
    with pytest.raises(ValueError, match="between 2 and the model's 4 layers"):
        LLM(checkpoint, num_blocks=16, block_size=4, pipeline_stages=5)


def test_pipeline_stages_score_prompts_like_the_whole_model(checkpoint):
    """Prompt logprobs through two stage processes, chunked and batched with generation (one group per step)."""
    from rtserve.llm.sampling_params import SamplingParams

    prompts = [list(range(3, 40)), [5, 9, 11, 2]]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2)
    whole = LLM(checkpoint, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    want = whole.generate(prompts, params)
    split = LLM(checkpoint, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                pipeline_stages=2, pipeline_micro_batches=2)
    split.runner.min_group_tokens = 2  # groups would form if the scored rows allowed them
    try:
        got = split.generate(prompts, params)
    finally:
        split.runner.close()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert [e.token for e in g.prompt_logprobs[1:]] == [e.token for e in w.prompt_logprobs[1:]]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]))
