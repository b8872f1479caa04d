"""Prompt logprobs (scoring) against transformers' log_softmax, for every architecture the engine
loads: cold, chunked over several steps, with the prefix cache warm, batched with generation."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
ARCHS = {  # as test_llama_vs_transformers builds them, and Mistral
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}
GPT2 = dict(vocab_size=97, n_embd=64, n_inner=112, n_layer=2, n_head=4, n_positions=256)
PROMPT = [5, 17, 3, 88, 42, 7, 7, 19, 60, 11, 23, 1, 96, 50, 50, 2, 31, 64, 8, 70, 12, 45]  # 22 tokens
TOL = 2e-3


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    cfg_name, model_name, extra = ARCHS[request.param]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra) if extra is not None else \
        getattr(transformers, cfg_name)(**GPT2)
    ref = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path, safe_serialization=True)
    return path, ref


def reference(ref, prompt: list[int]) -> torch.Tensor:
    """(P - 1, V) transformers' log_softmax at positions 0 .. P-2 (they score tokens 1 .. P-1)."""
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(lps: list, ref_lp: torch.Tensor, prompt: list[int], k: int) -> None:
    assert lps[0] is None and len(lps) == len(prompt)
    for pos, entry in enumerate(lps[1:]):
        row = ref_lp[pos]
        assert abs(entry.logprob - float(row[prompt[pos + 1]])) < TOL, pos
        assert entry.rank == int((row > row[prompt[pos + 1]]).sum()) + 1 or abs(
            float(row.sort(descending=True).values[entry.rank - 1]) - entry.logprob) < TOL, pos
        top = torch.topk(row, k)
        assert [t for t, _ in entry.top] == top.indices.tolist() or len(set(top.values.tolist())) < k
        assert max(abs(v - float(w)) for (_, v), w in zip(entry.top, top.values)) < TOL


def test_prompt_logprobs_match_transformers_cold_chunked_and_cached(checkpoint):
    path, ref = checkpoint
    ref_lp = reference(ref, PROMPT)
    # a budget of 8 tokens: the 22-token prompt is computed in 3 chunks
    llm = LLM(path, num_blocks=64, block_size=4, max_num_batched_tokens=8)
    score = SamplingParams(max_tokens=0, prompt_logprobs=3)
    cold = llm.generate([PROMPT], score)[0]
    check(cold.prompt_logprobs, ref_lp, PROMPT, 3)
    assert cold.outputs[0].token_ids == [] and cold.outputs[0].finish_reason == "length"
    # warm: the prompt's blocks are cached now; a generating request uses them, a scoring one still scores right
    hits = llm.scheduler.bm.num_prefix_hits
    llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))
    assert llm.scheduler.bm.num_prefix_hits > hits
    warm = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))[0]
    check(warm.prompt_logprobs, ref_lp, PROMPT, 3)
    with torch.no_grad():
        assert warm.outputs[0].token_ids == [int(ref(torch.tensor([PROMPT])).logits[0, -1].argmax())]
    llm.scheduler.bm.check_integrity()
    assert llm.scheduler.bm.num_used == 0


def test_scoring_batches_with_generation(checkpoint, tmp_path):
    """A scoring request and a generating one in the same steps: both right."""
    path, ref = checkpoint
    llm = LLM(path, num_blocks=64, block_size=4, max_num_batched_tokens=64)
    gen_prompt = [3, 9, 27, 81]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([gen_prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                pad_token_id=0, eos_token_id=None)[0, len(gen_prompt):].tolist()
    gen = llm.make_sequences(gen_prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    llm.scheduler.add(gen)
    llm.step()  # the generating request is decoding when the scoring one arrives
    scored = llm.make_sequences(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    llm.scheduler.add(scored)
    before = gen.num_generated
    llm.step()  # one step: the decode of one and the first prefill chunk of the other
    assert gen.num_generated == before + 1 and scored.num_computed_tokens == len(PROMPT)
    while llm.scheduler.has_work:
        llm.step()
    assert gen.generated_ids == expected
    check([None, *scored.prompt_lps], reference(ref, PROMPT), PROMPT, 1)
    assert scored.num_generated == 0 and scored.finish_reason.value == "length"


def test_n_choices_and_preemption_keep_the_values(checkpoint):
    path, ref = checkpoint
    ref_lp = reference(ref, PROMPT)
    # 8 blocks of 4: two 22-token sequences cannot both hold their prompt: one is preempted and
    # recomputed (no prefix cache: with it the second choice would share the first one's blocks)
    llm = LLM(path, num_blocks=8, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False)
    seqs = llm.make_sequences(PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, n=2,
                                                     prompt_logprobs=2))
    for s in seqs:
        llm.scheduler.add(s)
    while llm.scheduler.has_work:
        llm.step()
    assert sum(s.num_preemptions for s in seqs) >= 1
    for s in seqs:  # each choice scores its prompt once, whatever was recomputed
        check([None, *s.prompt_lps], ref_lp, PROMPT, 2)
    assert seqs[0].generated_ids == seqs[1].generated_ids
    llm.scheduler.bm.check_integrity()


def test_ranks_only_when_asked_and_top1_from_max(checkpoint):
    """``prompt_ranks=False`` (the echo shape has no ranks) skips the rank pass; the values and the
    top-1 (taken with a max when one alternative is asked for) are those of the full computation."""
    path, ref = checkpoint
    ref_lp = reference(ref, PROMPT)
    llm = LLM(path, num_blocks=64, block_size=4, enable_prefix_caching=False)  # the second computes too
    with_ranks, without = (llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=1, prompt_ranks=r))[0]
                           for r in (True, False))
    check(with_ranks.prompt_logprobs, ref_lp, PROMPT, 1)
    assert all(e.rank is None for e in without.prompt_logprobs[1:])
    for a, b in zip(with_ranks.prompt_logprobs[1:], without.prompt_logprobs[1:]):
        assert a.logprob == b.logprob and a.top == b.top and a.rank >= 1


def test_scored_prompts_share_cached_blocks_with_their_scores(checkpoint):
    """A scored prompt takes the cached blocks another scored prompt computed (their scores come
    with them) -- in a later step, or in the same step by waiting one: lm-eval's choices of one
    question. Blocks whose scores have fewer alternatives or no ranks are not taken; values stay exact."""
    path, ref = checkpoint
    llm = LLM(path, num_blocks=128, block_size=4)
    other = PROMPT[:13] + [9, 9, 4, 77]  # shares 3 full blocks (12 tokens) and one more token
    first = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    later = llm.generate([other], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    check(first.prompt_logprobs, reference(ref, PROMPT), PROMPT, 2)
    check(later.prompt_logprobs, reference(ref, other), other, 2)
    assert later.num_cached_tokens == 12
    more = llm.generate([other], SamplingParams(max_tokens=0, prompt_logprobs=3))[0]  # 3 > the 2 kept
    check(more.prompt_logprobs, reference(ref, other), other, 3)
    assert more.num_cached_tokens == 0
    # the same step: the second waits one step for the first's blocks (their scores have 3 alternatives now)
    third = PROMPT[:13] + [1, 2, 3]
    seqs = [s for p in (PROMPT[:17], third) for s in llm.make_sequences(p, SamplingParams(max_tokens=0, prompt_logprobs=1))]
    llm.scheduler.bm = type(llm.scheduler.bm)(llm.scheduler.bm.num_blocks, 4, True, max_scored_blocks=64)  # cold
    for s in seqs:
        llm.scheduler.add(s)
    while llm.scheduler.has_work:
        llm.step()
    assert [s.num_cached_tokens for s in seqs] == [0, 12]
    for s, p in zip(seqs, (PROMPT[:17], third)):
        check([None, *s.prompt_lps], reference(ref, p), p, 1)
    llm.scheduler.bm.check_integrity()
