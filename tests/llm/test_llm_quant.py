"""Weight-only int8 / int4 quantization of native-engine checkpoints: format, loading, fidelity,
memory, and errors before any work."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import write_random_llama  # noqa: E402
from rtserve.compress.llm_quant import quantize_checkpoint  # noqa: E402
from rtserve.llm.engine import LLM  # noqa: E402
from rtserve.llm.sampling_params import SamplingParams  # noqa: E402
from rtserve.llm.quant_linear import QuantLinear, dequantize, pack_int4, quantize, unpack_int4  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_random_llama(path, std=0.1, intermediate_size=128, max_position_embeddings=128)
    return path


def test_quantize_roundtrip_and_packing():
    w = torch.randn(8, 64)
    q8, s8 = quantize(w, 8)
    assert q8.dtype == torch.int8 and s8.shape == (8,)
    assert (dequantize(q8, s8) - w).abs().max() <= s8.max() / 2 + 1e-6
    q4, s4 = quantize(w, 4, group_size=16)
    assert s4.shape == (8, 4) and int(q4.min()) >= -8 and int(q4.max()) <= 7
    # the clipped-range search never does worse than plain absmax / 7 scaling, group by group
    wg = w.reshape(8, 4, 16)
    plain = wg.abs().amax(-1, keepdim=True) / 7
    plain_err = (torch.round(wg / plain).clamp(-8, 7) * plain - wg).pow(2).sum(-1)
    err = (dequantize(q4, s4).reshape(8, 4, 16) - wg).pow(2).sum(-1)
    assert bool((err <= plain_err + 1e-6).all()) and float(err.sum()) < float(plain_err.sum())
    assert torch.equal(unpack_int4(pack_int4(q4)), q4) and pack_int4(q4).shape == (8, 32)


@pytest.mark.parametrize("method,group,min_cos,min_agree,ratio", [
    ("int8-weight", 128, 0.9999, 0.97, 0.27), ("int4-weight", 16, 0.999, 0.90, 0.20)])
def test_quantized_checkpoint_serves_close_to_the_original(llama, tmp_path, method, group, min_cos, min_agree, ratio):
    recipe = quantize_checkpoint(llama, tmp_path / "q", method, group_size=group)
    side = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert side["method"] == method and len(side["modules"]) == 2 * 7 and side["bytes_after"] < side["bytes_before"]
    assert recipe["bits"] == (8 if method == "int8-weight" else 4)
    base = LLM(llama, num_blocks=64, block_size=4)
    quant = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    layer = quant.runner.model.model.layers[0]
    assert isinstance(layer.mlp.gate_up, QuantLinear) and isinstance(layer.self_attn.qkv, QuantLinear)
    # the projections' memory at rest against float32
    qbytes = sum(m.weight_bytes for l in quant.runner.model.model.layers
                 for m in (l.self_attn.qkv, l.self_attn.o, l.mlp.gate_up, l.mlp.down))
    fbytes = 2 * 4 * (64 * (64 + 2 * 32) + 64 * 64 + 64 * 256 + 128 * 64)
    assert qbytes <= ratio * fbytes, (qbytes, fbytes)
    # next-token distributions along random texts: top-1 agreement at every position, logit cosine
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 97, (8, 24), generator=g).tolist()
    assert _top1_agreement(base, quant, prompts) >= min_agree
    lb, lq = _last_logits(base, prompts[0]), _last_logits(quant, prompts[0])
    assert torch.nn.functional.cosine_similarity(lb, lq, dim=0) > min_cos


def _last_logits(llm, prompt):
    from rtserve.llm.block_manager import BlockManager
    from rtserve.llm.scheduler import Scheduler, SchedulerConfig
    from rtserve.llm.sequence import Sequence

    sched = Scheduler(SchedulerConfig(), BlockManager(llm.runner.num_blocks, llm.runner.block_size))
    sched.add(Sequence(list(prompt), max_tokens=1))
    return llm.runner.run(sched.schedule())[0]


def _top1_agreement(base, quant, prompts) -> float:
    """Per position: the argmax of every prefix's next-token distribution."""
    same = total = 0
    for p in prompts:
        for n in range(4, len(p) + 1):
            same += int(_last_logits(base, p[:n]).argmax() == _last_logits(quant, p[:n]).argmax())
            total += 1
    return same / total


@pytest.mark.parametrize("method,kw,needle", [
    ("int3-weight", {}, "is not one of"),
    ("int4-weight", {"group_size": 48}, "multiples of the group size 48"),
])
def test_bad_llm_quantization_requests(llama, tmp_path, method, kw, needle):
    with pytest.raises(ValueError, match=needle):
        quantize_checkpoint(llama, tmp_path / "q", method, **kw)
    assert not (tmp_path / "q").exists()


def test_quantizing_twice_and_a_damaged_checkpoint_are_errors(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    quantize_checkpoint(llama, tmp_path / "q", "int8-weight")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "q2", "int8-weight")
    t = load_file(tmp_path / "q" / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight.qweight"]
    save_file(t, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj.weight.qweight' .* is missing"):
        LLM(tmp_path / "q", num_blocks=8, block_size=4)


def test_cpu_kernels_agree_with_the_dequantizing_matmul(llama, tmp_path, monkeypatch):
    """The layers' CPU kernels (llm/cpu_quant.py, whichever the load-time timing picked) keep the
    fidelity of expanding the weight per call: same top-1 agreement with float32, close logits."""
    quantize_checkpoint(llama, tmp_path / "q", "int8-weight")
    base = LLM(llama, num_blocks=64, block_size=4)
    fast = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    assert fast.runner.model.model.layers[0].mlp.gate_up.kernel.startswith("cpu:")
    monkeypatch.setenv("RTSERVE_QUANT_KERNEL", "dequant")
    slow = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    assert slow.runner.model.model.layers[0].mlp.gate_up.kernel == "dequant"
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 97, (6, 20), generator=g).tolist()
    assert _top1_agreement(base, fast, prompts) >= _top1_agreement(base, slow, prompts)
    for p in prompts[:3]:
        a, b = _last_logits(fast, p), _last_logits(slow, p)
        assert float((a - b).abs().max()) <= 2 ** -7 * float(b.abs().max())


def test_int8_checkpoints_ask_for_an_int8_head_whose_top_logits_are_exact(llama, tmp_path):
    from rtserve.llm.quant_linear import HalfHead, Int8Head

    quantize_checkpoint(llama, tmp_path / "q", "int8-weight")
    side_path = tmp_path / "q" / "quantization.json"
    side = json.loads(side_path.read_text())
    side_head = {"dtype": "int8", "exact_top_k": 8}
    assert side["lm_head"] == side_head
    head = LLM(tmp_path / "q", num_blocks=64, block_size=4).runner.model._head
    assert isinstance(head, Int8Head) and head.weight.dtype == torch.int8 and head.exact_top_k == 8
    w, q, s = head.half.float(), head.weight, head.scale
    if q.dim() == 3:  # in panels of 16 outputs (native.pack_panels)
        q = q.transpose(1, 2).reshape(w.shape)
    assert float((q.float() * s[:, None] - w).abs().max()) <= float(s.max()) / 2 + 1e-3  # int8 of the same weight
    for rows in (1, 3, 40):  # the native kernel for few rows, the float32 copy for many
        x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
        got, approx, exact = head(x), x @ (q.float() * s[:, None]).t(), x @ w.t()
        top = approx.topk(8, dim=-1).indices  # the 8 the int8 weights rank highest ...
        assert torch.allclose(got.gather(1, top), exact.gather(1, top), atol=1e-4)  # ... recomputed with float16 weights
        rest = torch.ones_like(got, dtype=torch.bool).scatter_(1, top, False)
        assert torch.allclose(got[rest], approx[rest], atol=1e-4)  # the others: the int8 weights
    # older checkpoints' float16 head still loads
    side["lm_head"] = {"dtype": "float16"}
    side_path.write_text(json.dumps(side))
    head = LLM(tmp_path / "q", num_blocks=64, block_size=4).runner.model._head
    assert type(head) is HalfHead and not hasattr(head, "half")  # the panels hold the float16 values
    x = torch.randn(3, w.shape[1])
    assert torch.allclose(head(x), x @ w.t(), atol=1e-4)  # the same float16 values (w), either kernel
    assert torch.allclose(head(x[:1]), x[:1] @ w.t(), atol=1e-4)
    for bad in ({"dtype": "int3"}, {"dtype": "int8", "exact_top_k": 0}, {"dtype": "int8", "exact_top_k": True},
                {"dtype": "int8", "rescore": 4}, "int8"):
        side["lm_head"] = bad
        side_path.write_text(json.dumps(side))
        with pytest.raises(ValueError, match="'lm_head' must be"):
            LLM(tmp_path / "q", num_blocks=64, block_size=4)
    quantize_checkpoint(llama, tmp_path / "q4", "int4-weight", group_size=16)  # int4 asks for the same head
    assert json.loads((tmp_path / "q4" / "quantization.json").read_text())["lm_head"] == side_head


def test_int8_head_greedy_decoding_is_the_same_natively_and_on_pytorch(llama, tmp_path, monkeypatch):
    """The native decode step rescoring the top logits in C++ (decode_logits' head_exact) picks the
    tokens the PyTorch path picks."""
    from rtserve.llm.native import ops

    if ops() is None:
        pytest.skip("native kernels not built here")
    quantize_checkpoint(llama, tmp_path / "q", "int8-weight")
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, 97, (4, 9), generator=g).tolist()
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fast = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    assert fast.runner.model._native is not None and fast.runner.model._native.head_args[1] is not None
    native = [o.outputs[0].token_ids for o in fast.generate(prompts[:1], p)]
    monkeypatch.setenv("RTSERVE_NATIVE_DECODE", "0")
    plain = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    assert plain.runner.model._native is None
    assert native == [o.outputs[0].token_ids for o in plain.generate(prompts[:1], p)]


def test_int8_panels_of_k_pairs_load_and_decode(llama, tmp_path, monkeypatch):
    """Where the build has int8 panels of k pairs (AVX2, AVX-512 VNNI) they are the default when the
    build says so (AVX-512 VNNI) and RTSERVE_INT8_PAIRS=1 / 0 turns them on / off: the layers keep that
    layout (the head too where its vocabulary is whole panels), and the fused and PyTorch paths decode
    with it, close to the float-widened panels' logits."""
    from rtserve.llm.native import ops

    if ops() is None or not ops().int8_pairs():
        pytest.skip("no int8 panels of k pairs in this build")
    quantize_checkpoint(llama, tmp_path / "q", "int8-weight")
    prompt = torch.randint(1, 97, (11,), generator=torch.Generator().manual_seed(5)).tolist()

    def width(llm):
        return llm.runner.model.model.layers[0].mlp.gate_up.native_weights()[0].shape[-1]

    assert width(LLM(tmp_path / "q", num_blocks=64, block_size=4)) == (32 if ops().int8_pairs_default() else 16)
    monkeypatch.setenv("RTSERVE_INT8_PAIRS", "0")
    floats = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    assert width(floats) == 16
    base = _last_logits(floats, prompt)
    monkeypatch.setenv("RTSERVE_INT8_PAIRS", "1")
    llm = LLM(tmp_path / "q", num_blocks=64, block_size=4)
    assert width(llm) == 32
    got = _last_logits(llm, prompt)
    assert float((got - base).abs().max()) <= 1e-3 * float(base.abs().max())
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert len(llm.generate([prompt, prompt[:5]], p)[1].outputs[0].token_ids) == 6
