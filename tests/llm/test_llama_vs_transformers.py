"""Our decoders (the Llama family and GPT-2) against the transformers reference, on tiny random
checkpoints."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rtserve.llm.block_manager import BlockManager  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.engine_config import EngineConfig  # noqa: E402
from rtserve.llm.model_runner import ModelRunner  # noqa: E402
from rtserve.llm.native import ops as native_ops  # noqa: E402
from rtserve.llm.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from rtserve.llm.sequence import Sequence  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

ARCHS = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}
GPT2 = dict(vocab_size=97, n_embd=64, n_inner=112, n_layer=2, n_head=4, n_positions=256)
# a tensor to damage in test_bad_checkpoints_name_the_problem
UP_PROJ = {"gpt2": "transformer.h.1.mlp.c_fc.weight"}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    cfg_name, model_name, extra = ARCHS[request.param]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra) if extra is not None else \
        getattr(transformers, cfg_name)(**GPT2)
    ref = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # random, not-too-small weights so differences would show
        for p in ref.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path, safe_serialization=True)
    return path, ref, request.param


def ref_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                           pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("native", [True, False], ids=["native-decode", "pytorch-decode"])
def test_logits_match_for_prefill_and_each_decode_step(checkpoint, native, monkeypatch):
    path, ref, name = checkpoint
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "1" if native else "0")
    runner = ModelRunner(path, EngineConfig(num_blocks=32, block_size=4))
    if native and name != "gpt2" and native_ops() is not None:  # the decode steps below take the native path
        assert runner.model._native is not None
        calls = count_native_calls(runner.model._native, monkeypatch)
    else:
        assert getattr(runner.model, "_native", None) is None
        calls = None
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(32, 4))
    prompt = [5, 17, 3, 88, 42, 7, 7, 19, 60]
    seq = Sequence(list(prompt), max_tokens=4)
    sched.add(seq)
    for step in range(4):
        out = sched.schedule()
        ours = runner.run(out)[0]
        with torch.no_grad():
            theirs = ref(torch.tensor([seq.token_ids])).logits[0, -1]
        assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4), (step, (ours - theirs).abs().max())
        sched.update(out, {seq.seq_id: int(theirs.argmax())})
    # every decode step after the prefill ran natively, and the 9-token prefill too where it fits
    assert calls is None or calls == [1] * (3 + (runner.model._native.max_rows >= len(prompt)))


def count_native_calls(native, monkeypatch) -> list:
    calls, forward = [], native.forward

    def counted(*a, **k):
        calls.append(1)
        return forward(*a, **k)
    monkeypatch.setattr(native, "forward", counted)
    return calls


def test_native_decode_of_several_sequences_matches_the_pytorch_path(checkpoint, monkeypatch):
    """Batches of ragged contexts (1 to 40 tokens, across block boundaries) on the native decode
    path, forced up to 8 rows, give the same greedy tokens as the PyTorch path."""
    path, _, name = checkpoint
    if name == "gpt2" or native_ops() is None:
        pytest.skip("the native decode path is for the Llama family, where the kernels build")
    prompts = [[3, 9, 27], list(range(10, 47)), [1], list(range(60, 80)), [42] * 11, list(range(2, 30, 3))]
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "0")
    expected = LLM(path, num_blocks=64, block_size=4, max_num_seqs=6).generate_greedy(prompts, max_tokens=8)
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "1")
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE_ROWS", "8")
    llm = LLM(path, num_blocks=64, block_size=4, max_num_seqs=6)
    calls = count_native_calls(llm.runner.model._native, monkeypatch)
    assert llm.generate_greedy(prompts, max_tokens=8) == expected
    assert len(calls) >= 7  # the decode steps ran natively


def test_greedy_batched_ragged_and_chunked_matches(checkpoint):
    path, ref, _ = checkpoint
    prompts = [[3, 9, 27], list(range(10, 47)), [1], list(range(60, 80)), [42] * 11, list(range(2, 30, 3))]
    expected = [ref_greedy(ref, p, 8) for p in prompts]
    # small blocks and a small token budget: prefill is chunked and mixed with decode steps
    llm = LLM(path, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    assert llm.generate_greedy(prompts, max_tokens=8) == expected
    llm.scheduler.bm.check_integrity()
    assert llm.scheduler.bm.num_used == 0
    # again, now with prefix-cache hits on the same prompts
    assert llm.generate_greedy(prompts, max_tokens=8) == expected
    assert llm.scheduler.bm.num_prefix_hits > 0


def test_decode_groups_split_by_context_length_match(checkpoint, monkeypatch):
    """One long sequence among short ones: the decode step runs two groups (``decode_buckets``) on
    the PyTorch path (the native decode path attends through block tables, without groups)."""
    from rtserve.llm import model_runner

    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "0")
    path, ref, _ = checkpoint
    sizes = []
    real = model_runner.decode_buckets
    monkeypatch.setattr(model_runner, "decode_buckets", lambda m, bs: sizes.append(len(g := real(m, bs))) or g)
    prompts = [list(range(1, 90)) + list(range(1, 90)), [3, 9, 27], [5], [7, 8], [11, 12, 13], [2, 4]]
    expected = [ref_greedy(ref, p, 6) for p in prompts]
    llm = LLM(path, num_blocks=128, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    assert llm.generate_greedy(prompts, max_tokens=6) == expected
    assert max(sizes) >= 2


def test_preemption_under_a_small_cache_keeps_outputs(checkpoint):
    path, ref, _ = checkpoint
    prompts = [list(range(i, i + 12)) for i in (1, 20, 40)]
    expected = [ref_greedy(ref, p, 10) for p in prompts]
    llm = LLM(path, num_blocks=12, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert llm.generate_greedy(prompts, max_tokens=10) == expected


def test_bad_checkpoints_name_the_problem(checkpoint, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path, _, arch = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(bad / "model.safetensors")
    name = UP_PROJ.get(arch, "model.layers.1.mlp.up_proj.weight")
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=f"{name}' has shape"):
        ModelRunner(bad, EngineConfig(num_blocks=8, block_size=4))
    del tensors[name]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=f"lacks tensor '{name}'"):
        ModelRunner(bad, EngineConfig(num_blocks=8, block_size=4))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FalconForCausalLM.*not supported"):
        ModelRunner(bad, EngineConfig(num_blocks=8, block_size=4))


def test_sampling_seed_n_stop_tokens_and_logprobs(checkpoint):
    from rtserve.llm.sampling_params import SamplingParams

    path, ref, _ = checkpoint
    llm = LLM(path, num_blocks=64, block_size=4)
    prompt = [4, 8, 15, 16, 23, 42]
    seeded = SamplingParams(max_tokens=12, temperature=1.5, seed=123, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    batched = llm.generate([[1, 2, 3], prompt, list(range(30))], seeded)[1].outputs[0].token_ids
    assert alone == batched
    other = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, seed=124, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone
    many = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, seed=123, n=3, ignore_eos=True))
    assert [o.index for o in many[0].outputs] == [0, 1, 2] and many[0].outputs[0].token_ids == alone
    assert len({tuple(o.token_ids) for o in many[0].outputs}) > 1

    greedy = ref_greedy(ref, prompt, 6)
    stop = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(greedy[3],),
                                                 ignore_eos=True))[0].outputs[0]
    first = greedy.index(greedy[3])
    assert stop.token_ids == greedy[:first + 1] and stop.finish_reason == "stop"
    # ignore_eos drops EOS from a sequence's stop set and keeps the request's own stop tokens
    with_eos = llm.make_sequences(prompt, SamplingParams(stop_token_ids=(greedy[3],)))[0].stop_token_ids
    assert with_eos == {greedy[3]} | llm.eos_token_ids
    assert llm.make_sequences(prompt, SamplingParams(stop_token_ids=(greedy[3],), ignore_eos=True))[0].stop_token_ids \
        == {greedy[3]}

    lp = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1], -1)
    chosen, alts = lp.logprobs[0]
    assert chosen == pytest.approx(float(ref_lp.max()), abs=1e-4)
    assert alts[0][0] == lp.token_ids[0] and len(alts) == 2
    assert llm.scheduler.bm.num_used == 0


def test_gpt2_checkpoint_in_the_original_layout_loads(tmp_path):
    """The hub's original GPT-2 checkpoints name tensors without ``transformer.`` and carry the
    causal-mask buffers ``attn.bias``; both load, with the same logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
    ref.save_pretrained(tmp_path / "new", safe_serialization=True)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "new" / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    save_file(tensors, tmp_path / "old" / "model.safetensors")
    prompts = [[1, 2, 3, 4], list(range(30, 50))]
    expected = [ref_greedy(ref, p, 6) for p in prompts]
    assert LLM(tmp_path / "old", num_blocks=32, block_size=4).generate_greedy(prompts, max_tokens=6) == expected


def test_bfloat16_on_cpu_tracks_float32(checkpoint):
    """bfloat16 weights and KV cache on CPU: logits close to float32's (cosine), same argmax."""
    path, _, _ = checkpoint
    prompt = [5, 17, 3, 88, 42, 7, 7, 19, 60]
    logits = {}
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(path, EngineConfig(num_blocks=8, block_size=4, dtype=dtype))
        sched = Scheduler(SchedulerConfig(), BlockManager(8, 4))
        sched.add(Sequence(list(prompt), max_tokens=1))
        logits[dtype] = runner.run(sched.schedule())[0]
        assert runner.kv_caches[0].dtype == getattr(torch, dtype)
    cos = torch.nn.functional.cosine_similarity(logits["float32"], logits["bfloat16"], dim=0)
    assert cos > 0.99 and logits["float32"].argmax() == logits["bfloat16"].argmax()


def test_dense_forward_for_training_matches_transformers(checkpoint):
    """``forward_dense`` (distillation and training: no KV cache) gives transformers' logits."""
    from rtserve.llm.config import DecoderConfig
    from rtserve.llm.models.llama import LlamaForCausalLM
    from rtserve.llm.weights import load_weights

    path, ref, arch = checkpoint
    if arch == "gpt2":
        pytest.skip("forward_dense is for the Llama family")
    c = DecoderConfig.from_dir(path)
    with torch.device("meta"):
        m = LlamaForCausalLM(c)
    load_weights(m, path, torch.float32, torch.device("cpu"), m.tied_weights if c.tie_word_embeddings else None)
    m.tie_weights()
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.forward_dense(ids), ref(ids).logits, atol=2e-4, rtol=1e-4)
