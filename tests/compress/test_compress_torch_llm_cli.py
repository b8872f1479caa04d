"""``rtserve compress`` on PyTorch spec models (--prune, --distill) and on decoder checkpoints
(--quantize int8-weight/int4-weight): new repository versions with a computed report, and clear
errors before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtserve.cli import main
from rtserve.spec.model import SpecModel, load_spec_model, save_spec_model
from rtserve.demo import digits_cnn

STUDENT = {"layers": [["conv2d", 4, 3, {"padding": 1}], ["relu"], ["maxpool2d", 2], ["flatten"], ["linear", 10]]}


@pytest.fixture()
def repo(tmp_path):
    torch.manual_seed(0)
    model = digits_cnn().eval()
    d = tmp_path / "repo" / "digits"
    save_spec_model(SpecModel(model, (1, 8, 8), "image", "logits"), d / "1")
    (d / "model.yaml").write_text("backend: onnx\nmax_batch_size: 16\nversion_policy: all\n")
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():  # labels the teacher agrees with, so accuracy is meaningful
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "data.npz", image=x, labels=y)
    (tmp_path / "student.json").write_text(json.dumps(STUDENT))
    return tmp_path, d, model


def test_spec_model_roundtrip(repo):
    _, d, model = repo
    sm = load_spec_model(d / "1")
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(sm.model(x), model(x))


def test_structured_prune_and_distill_write_versions_with_reports(repo, capsys):
    tmp, d, _ = repo
    common = ["--eval-data", str(tmp / "data.npz"), "--out", str(d), "--repeats", "5"]
    assert main(["compress", str(d / "1"), "--prune", "0.5", "--structured", "--data", str(tmp / "data.npz"),
                 "--epochs", "1", *common]) == 0
    r = json.loads((d / "2" / "report.json").read_text())
    assert r["method"] == "prune-structured" and r["result"]["params"] < 0.3 * r["source"]["params"]
    assert [lay["after"] for lay in r["recipe"]["layers"]] == [8, 16, 32]
    assert {lat["batch"] for lat in r["result"]["latency"]} == {1, 16}
    assert r["source"]["fidelity"]["accuracy"] == 1.0 and 0 <= r["result"]["fidelity"]["accuracy"] <= 1
    assert (d / "2" / "model.onnx").stat().st_size == r["result"]["file_bytes"]
    assert load_spec_model(d / "2").model[0].out_channels == 8
    assert main(["compress", str(d / "1"), "--distill", "--student", str(tmp / "student.json"),
                 "--data", str(tmp / "data.npz"), "--epochs", "2", *common]) == 0
    r = json.loads((d / "3" / "report.json").read_text())
    assert r["recipe"]["student_params"] == 4 * 9 + 4 + 64 * 10 + 10 and r["recipe"]["epochs"] == 2


@pytest.mark.parametrize("flags,needle", [
    (["--prune", "1.5", "--structured"], "ratio must be in"),
    (["--distill", "--data", "{data}"], "needs --student"),
    (["--distill", "--student", "{student}"], "needs --data"),
    (["--prune", "0.5", "--distill", "--student", "{student}", "--data", "{data}"], "exactly one of"),
    (["--prune", "0.5", "--epochs", "3"], "fine-tuning needs --data"),
    (["--prune", "0.5", "--data", "{missing}"], "does not exist"),
    ([], "exactly one of"),
])
def test_bad_requests_fail_before_any_work(repo, capsys, flags, needle):
    tmp, d, _ = repo
    flags = [f.format(data=tmp / "data.npz", student=tmp / "student.json", missing=tmp / "nope.npz") for f in flags]
    assert main(["compress", str(d / "1"), *flags, "--out", str(d)]) == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["1", "model.yaml"]


def test_llm_weight_quantization_through_the_cli(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm" / "1", safe_serialization=True)
    (tmp_path / "lm" / "model.yaml").write_text("backend: llm\n")
    assert main(["compress", str(tmp_path / "lm" / "1"), "--quantize", "int8-weight", "--out", str(tmp_path / "lm")]) == 0
    r = json.loads((tmp_path / "lm" / "2" / "report.json").read_text())
    assert r["result"]["weight_bytes"] < 0.5 * r["source"]["weight_bytes"]
    assert r["fidelity"]["top1_agreement"] >= 0.9 and r["fidelity"]["positions"] == 16 * 64
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "lm" / "1"), "--quantize", "int4-weight", "--group-size", "48",
                 "--out", str(tmp_path / "lm")]) == 2
    assert "group size 48" in capsys.readouterr().err and not (tmp_path / "lm" / "3").exists()


def test_lm_distillation_through_the_cli(tmp_path, capsys):
    """A random-weight teacher, token ids as data: the student gets closer to the teacher (KL falls),
    and the engine serves the student folder."""
    transformers = pytest.importorskip("transformers")
    from rtserve.llm.engine import LLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions, unlike the near-uniform default init
        for n, p in teacher.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.5)
    teacher.save_pretrained(tmp_path / "teacher", safe_serialization=True)
    with torch.no_grad():  # text the teacher itself would write, so there is something to learn
        ids = teacher.generate(torch.randint(1, 61, (160, 2)), max_new_tokens=40, do_sample=True, top_k=0,
                               pad_token_id=0).reshape(-1).numpy()
    np.savez(tmp_path / "ids.npz", ids=ids)
    student = json.loads((tmp_path / "teacher" / "config.json").read_text())
    student.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    (tmp_path / "student.json").write_text(json.dumps(student))
    assert main(["compress", str(tmp_path / "teacher"), "--distill", "--student", str(tmp_path / "student.json"),
                 "--data", str(tmp_path / "ids.npz"), "--seq-len", "31", "--epochs", "10", "--lr", "3e-3", "--temperature", "1", "--alpha", "1",
                 "--out", str(tmp_path / "student")]) == 0
    r = json.loads((tmp_path / "student" / "report.json").read_text())
    assert r["student_params"] < r["teacher_params"] / 3
    assert r["fidelity"]["mean_kl"] < 0.9 * r["fidelity_before"]["mean_kl"]
    out = LLM(tmp_path / "student", num_blocks=32, block_size=4).generate_greedy([[1, 2, 3]], max_tokens=5)
    assert len(out[0]) == 5 and "top-1 agreement" in capsys.readouterr().out
    student["vocab_size"] = 60
    (tmp_path / "bad.json").write_text(json.dumps(student))
    assert main(["compress", str(tmp_path / "teacher"), "--distill", "--student", str(tmp_path / "bad.json"),
                 "--data", str(tmp_path / "ids.npz"), "--out", str(tmp_path / "s2")]) == 2
    assert "vocab_size 60 differs" in capsys.readouterr().err


def test_lm_structured_pruning_then_distillation_from_the_original(tmp_path, capsys):
    """FFN neurons and head groups go (smaller matrices, a config the engine serves); distilling the
    pruned checkpoint from the original brings it back towards the teacher."""
    transformers = pytest.importorskip("transformers")
    from rtserve.llm.config import DecoderConfig
    from rtserve.llm.engine import LLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.5)
    teacher.save_pretrained(tmp_path / "t", safe_serialization=True)
    assert main(["compress", str(tmp_path / "t"), "--prune", "0.5", "--structured", "--prune-heads",
                 "--out", str(tmp_path / "p")]) == 0
    c = DecoderConfig.from_dir(tmp_path / "p")
    assert (c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 2, 1, 16)
    r = json.loads((tmp_path / "p" / "report.json").read_text())
    assert r["result_params"] < r["source_params"] and 0 <= r["fidelity"]["top1_agreement"] <= 1
    assert len(LLM(tmp_path / "p", num_blocks=16, block_size=4).generate_greedy([[1, 2]], max_tokens=3)[0]) == 3
    with torch.no_grad():
        ids = teacher.generate(torch.randint(1, 61, (160, 2)), max_new_tokens=40, do_sample=True, top_k=0,
                               pad_token_id=0).reshape(-1).numpy()
    np.savez(tmp_path / "ids.npz", ids=ids)
    assert main(["compress", str(tmp_path / "t"), "--distill", "--student", str(tmp_path / "p"), "--data",
                 str(tmp_path / "ids.npz"), "--seq-len", "31", "--epochs", "5", "--lr", "1e-3", "--temperature", "1",
                 "--alpha", "1", "--out", str(tmp_path / "d")]) == 0
    d = json.loads((tmp_path / "d" / "report.json").read_text())
    assert d["fidelity"]["mean_kl"] < d["fidelity_before"]["mean_kl"]
    assert main(["compress", str(tmp_path / "t"), "--prune", "0.5", "--out", str(tmp_path / "m")]) == 2
    assert "--structured" in capsys.readouterr().err
