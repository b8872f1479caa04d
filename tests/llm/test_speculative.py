"""Speculative decoding (llm/speculative/) against plain decoding on tiny random checkpoints:
greedy tokens identical with n-gram and draft-model proposals, batched with sequences that do not
speculate, with stop tokens, stop strings and max_tokens landing inside a proposal, preemption and
the prefix cache; logprobs, penalties and logit_bias as plain decoding's."""
from __future__ import annotations

import torch
import pytest

pytest.importorskip("transformers")

from models import write_random_llama, write_text_lm  # noqa: E402
from rtserve.llm.block_manager import block_hash  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402

NGRAM = {"method": "ngram", "num_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    write_random_llama(root / "target")
    write_random_llama(root / "target" / "same")  # the target's own weights: every proposal accepted
    noisy(root / "target", root / "target" / "other", 0.1)  # a draft that agrees often, not always
    return root / "target"


def noisy(src, dst, std: float) -> None:
    """A copy of checkpoint ``src`` with N(0, std) noise added to every weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    g = torch.Generator().manual_seed(7)
    w = {k: v + std * torch.randn(v.shape, generator=g) for k, v in load_file(src / "model.safetensors").items()}
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (5, 9, 17, 3, 30, 12):
        p = torch.randint(0, 97, (n,), generator=g).tolist()
        out.append(p + p[: n // 2] + p)  # repeats, so prompt lookup finds matches
    return out


def spec_config(kind: str) -> dict:
    return NGRAM if kind == "ngram" else {"method": "draft", "num_tokens": 4, "draft": kind.split("-")[1]}


def registered_blocks_are_real(llm: LLM, seqs_tokens: list[list[int]]) -> None:
    """Every block in the prefix cache holds a full block of some sequence's real tokens (never a
    rejected proposal)."""
    bs = llm.scheduler.bm.block_size
    real = set()
    for toks in seqs_tokens:
        parent = None
        for start in range(0, len(toks) - bs + 1, bs):
            parent = block_hash(parent, tuple(toks[start:start + bs]))
            real.add(parent)
    hashed = [b.hash for b in llm.scheduler.bm.blocks if b.hash is not None]
    assert hashed and all(h in real for h in hashed)


def run(llm: LLM, ps: list[list[int]], params: list[SamplingParams]):
    seqs = [llm.make_sequences(p, sp)[0] for p, sp in zip(ps, params)]
    for s in seqs:
        llm.scheduler.add(s)
    while llm.scheduler.has_work:
        llm.step()
    for s in seqs:
        llm.forget(s)
    return [(s.generated_ids, s.finish_reason, s.output_logprobs) for s in seqs]


@pytest.mark.parametrize("kind", ["ngram", "draft-same", "draft-other"])
def test_greedy_tokens_identical_with_stops_and_lengths_mid_proposal(ckpts, kind):
    ps = prompts()
    base = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (40, 2, 3, 7, 13, 33)]
    plain = LLM(ckpts, num_blocks=128, block_size=4)
    ref = run(plain, ps, base)
    # a stop token that first appears mid-output, for two of the sequences
    params = list(base)
    for i in (0, 4):
        toks = ref[i][0]
        j = next(j for j in range(4, len(toks)) if toks[j] not in toks[:j])
        params[i] = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(toks[j],))
    # batched with sequences that do not speculate: a seeded sampled one and one scoring its prompt
    extra = [SamplingParams(max_tokens=9, temperature=0.8, seed=3), SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=1)]
    ref = run(plain, ps + ps[:2], params + extra)
    spec = LLM(ckpts, num_blocks=128, block_size=4, speculative=spec_config(kind))
    got = run(spec, ps + ps[:2], params + extra)
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    assert ref[0][1].value == "stop" and len(ref[0][0]) < 40
    st = spec.speculator.stats
    assert st.num_drafts > 10 and st.num_accepted_tokens > 0
    if kind == "draft-same":
        assert st.num_accepted_tokens >= 0.9 * st.num_draft_tokens
    registered_blocks_are_real(spec, [p + g[0] for p, g in zip(ps + ps[:2], got)])
    # the prefix cache it left gives the same answers again (warm), with the blocks all returned
    assert [g[:2] for g in run(spec, ps + ps[:2], params + extra)] == [r[:2] for r in ref]
    assert spec.scheduler.bm.num_used == 0 and not spec.speculator._backoff


def test_preemption_under_speculation(ckpts):
    ps = prompts()
    params = [SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)] * len(ps)
    ref = run(LLM(ckpts, num_blocks=128, block_size=4), ps, params)
    for cfg in (NGRAM, spec_config("draft-same")):
        spec = LLM(ckpts, num_blocks=40, block_size=4, speculative=cfg)  # too few blocks: preemptions
        got = run(spec, ps, params)
        assert [g[0] for g in got] == [r[0] for r in ref]
        assert any(s for s in ps) and spec.scheduler.bm.num_used == 0


def test_logprobs_penalties_and_logit_bias_as_plain(ckpts):
    ps = prompts()
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, presence_penalty=0.4,
                             frequency_penalty=0.3, logprobs=0),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logit_bias=((5, 2.0), (7, -1.0)))]
    ps = ps[:4]
    ref = run(LLM(ckpts, num_blocks=128, block_size=4), ps, params)
    spec = LLM(ckpts, num_blocks=128, block_size=4, speculative=spec_config("draft-same"))
    got = run(spec, ps, params)
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    for (_, _, lg), (_, _, lr) in zip(got, ref):
        assert len(lg) == len(lr)
        for a, b in zip(lg, lr):
            assert abs(a[0] - b[0]) < 1e-4 and [t for t, _ in a[1]] == [t for t, _ in b[1]]
    assert spec.speculator.stats.num_accepted_tokens > 20


def test_stop_strings_inside_a_proposal(tmp_path):
    path = write_text_lm(tmp_path / "lm")
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    plain = LLM(path, num_blocks=128, block_size=4)
    spec = LLM(path, num_blocks=128, block_size=4, speculative={"method": "ngram", "num_tokens": 5,
                                                                 "prompt_lookup_min": 1})
    free = plain.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 12
    checked = 0
    for cut in range(3, min(len(free.text) - 2, 30), 3):  # stop strings ending at many places
        stop = free.text[cut:cut + 2]
        if not stop.strip():
            continue
        sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,), logprobs=1)
        a = plain.generate([prompt], sp)[0].outputs[0]
        b = spec.generate([prompt], sp)[0].outputs[0]
        assert (b.text, b.token_ids, b.finish_reason, len(b.logprobs)) == (a.text, a.token_ids, a.finish_reason,
                                                                          len(a.logprobs)), stop
        checked += 1
    assert checked >= 3 and spec.speculator.stats.num_drafts > 0


def test_max_model_len_and_budget_bound_the_proposals(ckpts):
    ps = [p[:20] for p in prompts()]
    params = [SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)] * len(ps)
    cfg = dict(num_blocks=128, block_size=4, max_model_len=40, max_num_batched_tokens=24)
    ref = run(LLM(ckpts, **cfg), ps, params)
    spec = LLM(ckpts, **cfg, speculative=spec_config("draft-same"))
    got = run(spec, ps, params)
    assert [g[:2] for g in got] == [r[:2] for r in ref]
    assert all(len(p) + len(g[0]) == 40 for p, g in zip(ps, got))


@pytest.mark.parametrize("kind", ["ngram", "draft-same"])
def test_native_verification_steps_match_the_pytorch_path(ckpts, kind, monkeypatch):
    """One sequence verifying its proposals: on CPU with the native kernels the step's rows (the
    token and its proposals, each with its own context length) run through the fused decode layers;
    the tokens are those of the PyTorch path."""
    from rtserve.llm.native import ops

    if ops() is None:
        pytest.skip("the native kernels did not build here")
    ps = prompts()[4:5]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)]
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "0")
    ref = run(LLM(ckpts, num_blocks=128, block_size=4, speculative=spec_config(kind)), ps, params)
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "1")
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE_ROWS", "8")
    spec = LLM(ckpts, num_blocks=128, block_size=4, speculative=spec_config(kind))
    rows, forward = [], spec.runner.model._native.forward
    monkeypatch.setattr(spec.runner.model._native, "forward", lambda ids, *a: rows.append(len(ids)) or forward(ids, *a))
    assert [g[:2] for g in run(spec, ps, params)] == [r[:2] for r in ref]
    assert max(rows) > 1 and spec.speculator.stats.num_accepted_tokens > 0  # verification steps ran natively


def test_verification_rows_attend_in_place_on_the_pytorch_path(ckpts, monkeypatch):
    """Without the fused decode layers, a verifying sequence's queries attend as one-query rows
    through the native decode attention (no gather): tokens as with the gather and mask."""
    from rtserve.llm import model_runner
    from rtserve.llm.native import ops

    if ops() is None:
        pytest.skip("the native kernels did not build here")
    ps, params = prompts(), [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 6
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "0")
    monkeypatch.setenv("RTSERVE_NATIVE_ATTENTION", "0")
    ref = run(LLM(ckpts, num_blocks=128, block_size=4, speculative=NGRAM), ps, params)
    monkeypatch.setenv("RTSERVE_NATIVE_ATTENTION", "1")
    split = []
    real = model_runner.decode_buckets
    monkeypatch.setattr(model_runner, "decode_buckets",
                        lambda m, bs: split.append(len({x[0] for x in m}) < len(m)) or real(m, bs))
    spec = LLM(ckpts, num_blocks=128, block_size=4, speculative=NGRAM)
    assert spec.runner.native_attention
    assert [g[:2] for g in run(spec, ps, params)] == [r[:2] for r in ref]
    assert any(split)  # some step had a sequence attending as several rows
