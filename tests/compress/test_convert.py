"""``rtserve convert``: HF encoder -> ONNX / .pt2, .pt2 -> ONNX, ONNX -> optimized / fp16 ONNX, each
verified against its source; bad input is an error before anything is written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from rtserve.cli import main  # noqa: E402
from rtserve.export.convert import ConversionError, convert  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    ref = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    path = tmp_path_factory.mktemp("bert")
    ref.save_pretrained(path, safe_serialization=True)
    return path, ref


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_encoder_to_onnx_gives_mean_pooled_normalised_embeddings(bert_dir, tmp_path):
    path, ref = bert_dir
    r = convert(path, "onnx", tmp_path / "e.onnx")
    assert r.verification.ok and r.verification.samples == 3 and r.output_names == ["sentence_embedding"]
    ids = np.array([[5, 9, 33, 2, 7, 0], [8, 8, 1, 0, 0, 0]], np.int64)
    mask = (np.arange(6)[None] < np.array([[6], [3]])).astype(np.int64)
    got = run(tmp_path / "e.onnx", {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():  # the reference: transformers' hidden states, mean over real tokens, L2
        h = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask)[..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_encoder_to_pt2_and_pt2_to_onnx(bert_dir, tmp_path):
    path, _ = bert_dir
    r = convert(path, "pt2", tmp_path / "e.pt2")
    assert r.verification.ok
    r2 = convert(tmp_path / "e.pt2", "onnx", tmp_path / "from_pt2.onnx")
    assert r2.source_kind == "pt2" and r2.verification.ok and r2.input_names == ["input_ids", "attention_mask"]


def test_pt2_image_model_to_onnx(tmp_path):
    from rtserve.demo import digits_cnn
    from rtserve.export.torch_export import export_pt2

    torch.manual_seed(0)
    export_pt2(digits_cnn(), torch.zeros(2, 1, 8, 8), tmp_path / "d.pt2", ["image"], ["logits"])
    r = convert(tmp_path / "d.pt2", "onnx", tmp_path / "d.onnx")
    assert r.verification.ok and r.output_names == ["logits"]
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    ep = torch.export.load(str(tmp_path / "d.pt2")).module()
    np.testing.assert_allclose(run(tmp_path / "d.onnx", {"image": x}), ep(torch.from_numpy(x)).detach().numpy(),
                               atol=1e-5)


def test_onnx_optimize_and_fp16_are_verified(bert_dir, tmp_path):
    path, _ = bert_dir
    convert(path, "onnx", tmp_path / "e.onnx")
    opt = convert(tmp_path / "e.onnx", "onnx", tmp_path / "opt.onnx", optimize=True)
    assert opt.verification.ok and opt.target == "onnx+optimized"
    half = convert(tmp_path / "e.onnx", "onnx", tmp_path / "half.onnx", fp16=True)
    assert half.verification.ok and half.verification.mean_cosine > 0.999
    assert (tmp_path / "half.onnx").stat().st_size < 0.7 * (tmp_path / "e.onnx").stat().st_size
    # a tolerance the fp16 model cannot meet: an error with the figures, and nothing written
    with pytest.raises(ConversionError, match=r"max \|difference\| .* > tolerance 1e-09"):
        convert(tmp_path / "e.onnx", "onnx", tmp_path / "strict.onnx", fp16=True, atol=1e-9)
    assert not (tmp_path / "strict.onnx").exists()


@pytest.mark.parametrize("make,target,kw,needle", [
    (lambda p: p / "missing.onnx", "onnx", {}, "does not exist"),
    (lambda p: (p / "m.bin").write_bytes(b"x") and p / "m.bin", "onnx", {}, "unknown source format"),
    (lambda p: (p / "cfg").mkdir() or (p / "cfg" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})) and p / "cfg", "onnx", {}, "cannot be converted"),
    (lambda p: p, "tensorrt", {}, "is not one of"),
])
def test_bad_input_is_a_clear_error(tmp_path, make, target, kw, needle):
    with pytest.raises(ConversionError, match=needle):
        convert(make(tmp_path), target, tmp_path / "out.onnx", **kw)


def test_cli_writes_a_new_repository_version_and_fails_cleanly(bert_dir, tmp_path, capsys):
    path, _ = bert_dir
    model = tmp_path / "repo" / "enc"
    (model / "1").mkdir(parents=True)
    (model / "model.yaml").write_text("backend: onnx\n")
    assert main(["convert", str(path), "--to", "onnx", "--out", str(model)]) == 0
    assert (model / "2" / "model.onnx").is_file() and (model / "2" / "conversion.json").is_file()
    assert "verified on 3 input sets" in capsys.readouterr().out
    assert main(["convert", str(model / "2" / "model.onnx"), "--to", "pt2", "--out", str(tmp_path / "x.pt2")]) == 2
    assert "converts only to optimized ONNX" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["tflite", "onnx", "pt2"])
def test_spec_model_converts_to_every_format_verified(tmp_path, target):
    """The digits CNN as a PyTorch spec model -> TFLite (the built-in writer, run by LiteRT), ONNX, .pt2."""
    from rtserve.spec.model import SpecModel, save_spec_model
    from rtserve.demo import digits_cnn

    torch.manual_seed(0)
    save_spec_model(SpecModel(digits_cnn().eval(), (1, 8, 8), "image", "logits"), tmp_path / "spec")
    r = convert(tmp_path / "spec", target, tmp_path / f"m.{target}")
    assert r.source_kind == "spec" and r.verification.ok and r.verification.samples == 3
    assert (tmp_path / f"m.{target}").stat().st_size > 1000


def test_tflite_needs_a_spec_model(bert_dir, tmp_path):
    with pytest.raises(ConversionError, match="--to tflite takes a PyTorch spec model"):
        convert(bert_dir[0], "tflite", tmp_path / "x.tflite")
