"""The CUDA decode path's Triton kernel, checked on CPU with Triton's interpreter
(``TRITON_INTERPRET=1``, set in a child process before triton is imported): the kernel against
the portable gather + SDPA path, and whole greedy generations through the engine against
transformers. Skipped when triton is not installed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

KERNEL = """
import torch
from rtserve.llm.triton_attention import paged_decode_attention
torch.manual_seed(0)
for S, Hq, Hkv, D, BS in ((3, 8, 2, 16, 4), (2, 4, 4, 24, 8), (1, 6, 2, 32, 16)):
    NB = 24
    kc, vc = torch.randn(NB, BS, Hkv, D), torch.randn(NB, BS, Hkv, D)
    lens = [1, 2 * BS + 1, 3 * BS][:S]
    tables = torch.zeros(S, 4, dtype=torch.int32)
    perm = torch.randperm(NB)
    for i, L in enumerate(lens):
        nb = -(-L // BS)
        tables[i, :nb] = perm[i * 4:i * 4 + nb].int()
    q = torch.randn(S, Hq, D)
    out = paged_decode_attention(q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32), 0.3)
    for i, L in enumerate(lens):
        pos = torch.arange(L)
        slots = tables[i, pos // BS].long() * BS + pos % BS
        k = kc.view(-1, Hkv, D)[slots].transpose(0, 1)
        v = vc.view(-1, Hkv, D)[slots].transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i][:, None], k, v, scale=0.3, enable_gqa=True)[:, 0]
        err = (ref - out[i]).abs().max().item()
        assert err < 1e-5, (S, Hq, Hkv, D, BS, i, err)
print("ok")
"""

ENGINE = """
import sys, torch, transformers
from rtserve.llm.engine import LLM
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
ref = transformers.LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    for p in ref.parameters():
        p.normal_(0, 0.2)
ref.save_pretrained(sys.argv[1], safe_serialization=True)
prompts = [[3, 9, 27], list(range(10, 31)), [42] * 6]
expected = []
for p in prompts:
    with torch.no_grad():
        o = ref.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected.append(o[0, len(p):].tolist())
llm = LLM(sys.argv[1], num_blocks=32, block_size=4, decode_kernel="triton")
assert llm.runner.decode_kernel == "triton"
assert llm.generate_greedy(prompts, max_tokens=6) == expected
print("ok")
"""


def _run(code: str, *args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_paged_decode_kernel_matches_sdpa_over_gathered_context():
    assert _run(KERNEL).strip().endswith("ok")


@pytest.mark.slow
def test_engine_with_the_kernel_generates_what_transformers_does(tmp_path):
    assert _run(ENGINE, str(tmp_path)).strip().endswith("ok")
