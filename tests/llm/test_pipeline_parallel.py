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


def test_bad_stage_counts(checkpoint):
    with pytest.raises(ValueError, match="between 2 and the model's 4 layers"):
        LLM(checkpoint, num_blocks=16, block_size=4, pipeline_stages=5)
