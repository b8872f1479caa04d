"""The LLM engine's CUDA path: the Triton paged decode kernel and CUDA graphs, float32 and bfloat16.
Skipped without CUDA (this machine, CI); run on a GPU machine."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from models import write_random_llama  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402

PROMPTS = [[3, 9, 27], list(range(10, 47)), [1], list(range(60, 80)), [42] * 11, list(range(2, 30, 3))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    ref = write_random_llama(path)
    expected = []
    for p in PROMPTS:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    return path, expected


def test_float32_kernel_and_graphs_match_transformers(checkpoint):
    path, expected = checkpoint
    llm = LLM(path, device="cuda", dtype="float32", num_blocks=64, block_size=4, max_num_batched_tokens=16,
              max_num_seqs=8)
    assert llm.runner.decode_kernel == "triton" and llm.runner.graphs is not None
    assert llm.generate_greedy(PROMPTS, max_tokens=8) == expected
    eager = LLM(path, device="cuda", dtype="float32", num_blocks=64, block_size=4, cuda_graphs=False,
                decode_kernel="gather")
    assert eager.generate_greedy(PROMPTS, max_tokens=8) == expected
    llm.scheduler.bm.check_integrity()


def test_bfloat16_on_cuda_tracks_float32(checkpoint):
    path, expected = checkpoint
    llm = LLM(path, device="cuda", dtype="bfloat16", num_blocks=64, block_size=4)
    assert llm.runner.kv_caches[0].dtype == torch.bfloat16
    got = llm.generate_greedy(PROMPTS, max_tokens=8)
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)) / sum(map(len, expected))
    assert agree >= 0.8, agree  # bf16 rounding may flip near-ties; most tokens agree


def test_memory_fraction_sizes_the_cache_on_cuda(checkpoint):
    path, _ = checkpoint
    llm = LLM(path, device="cuda", kv_cache_memory_fraction=0.05, max_model_len=256, max_num_seqs=4)
    assert llm.runner.cache.source == "fraction" and llm.runner.num_blocks >= 256 // 16
