"""The cross-encoder kind against sentence-transformers' ``CrossEncoder.predict`` (and transformers'
tokenizer for the pair encoding) on a tiny random ``BertForSequenceClassification``; load errors;
dynamic batching across requests, deterministically (requests queued before the worker starts)."""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cross_encoders import MAX_LENGTH, sentences, write_tiny_cross_encoder  # noqa: E402
from rtserve.config import ModelConfig  # noqa: E402
from rtserve.errors import ConfigError, Unavailable  # noqa: E402
from rtserve.models.cross_encoder import CrossEncoderModel  # noqa: E402

pytestmark = pytest.mark.timeout(120)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder

# short, long (truncated: the query, the document or both lose tokens) and mixed pairs
LONG = "the quick brown fox jumps over the lazy dog " * 6


def pairs() -> list[tuple[str, str]]:
    qs, ds = sentences(12, seed=1), sentences(12, seed=2, max_words=30)
    return list(zip(qs, ds)) + [("hello", LONG), (LONG, "snow"), (LONG, LONG), ("x", "y"), ("Héllo wörld ☃", "ça va")]


def served(path, **cfg) -> CrossEncoderModel:
    config = ModelConfig.from_dict("ce", {"backend": "cross_encoder", "device": "cpu", "warmup": False, **cfg})
    return CrossEncoderModel(config, path.parent, int(path.name))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("ce") / "1"
    ref = write_tiny_cross_encoder(path)
    return path, ref, served(path)


def test_pair_encoding_is_bert_pair_truncated_longest_first(tiny):
    path, _, model = tiny
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    tok = model.tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    for q, d in pairs():
        enc = model.encode([(q, d)])[0]
        ref = hf(q, d, truncation=True, max_length=MAX_LENGTH)
        assert enc.ids == ref["input_ids"] and enc.type_ids == ref["token_type_ids"], (q, d)
        assert len(enc.ids) <= MAX_LENGTH and enc.ids[0] == cls and enc.ids[-1] == sep
        first_sep = enc.ids.index(sep)
        assert enc.type_ids == [0] * (first_sep + 1) + [1] * (len(enc.ids) - first_sep - 1)
    q_ids = tok.encode("hello", add_special_tokens=False).ids
    d_ids = tok.encode("snow", add_special_tokens=False).ids
    assert model.encode([("hello", "snow")])[0].ids == [cls, *q_ids, sep, *d_ids, sep]
    long = model.encode([("hello", LONG)])[0]  # the document is the longer one: it alone is cut
    assert len(long.ids) == MAX_LENGTH and long.ids[:len(q_ids) + 2] == [cls, *q_ids, sep]


def _predict(path, batch_size=32):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(path), device="cpu").predict(pairs(), batch_size=batch_size)


def _ours(model) -> np.ndarray:
    return model._run(model.encode(pairs()))


def test_scores_equal_sentence_transformers_predict(tiny):
    pytest.importorskip("sentence_transformers")
    path, ref, model = tiny
    expected = _predict(path)  # sigmoid of the logit: CrossEncoder's default for one label
    got = _ours(model)
    assert np.abs(got - expected).max() < 1e-4
    assert np.ptp(expected) > 0.05  # the scores differ: the comparison means something
    with torch.no_grad():  # and the raw logits, one pair at a time through transformers
        q, d = pairs()[0]
        enc = transformers.AutoTokenizer.from_pretrained(str(path))(q, d, return_tensors="pt", truncation=True)
        assert abs(torch.sigmoid(ref(**enc).logits)[0, 0].item() - got[0]) < 1e-5


def test_identity_activation_from_config_gives_raw_logits(tmp_path):
    pytest.importorskip("sentence_transformers")
    path = tmp_path / "1"
    write_tiny_cross_encoder(path, activation="torch.nn.modules.linear.Identity")
    model = served(path)
    expected = _predict(path, batch_size=5)
    got = _ours(model)
    assert model.config_json()["activation"] == "identity"
    assert np.abs(got - expected).max() < 1e-4
    assert ((got < 0) | (got > 1)).any()  # logits, not probabilities


def test_scores_do_not_depend_on_the_batch(tiny):
    _, _, model = tiny
    together = _ours(model)
    alone = np.array([model._run(model.encode([p]))[0] for p in pairs()])
    assert np.abs(together - alone).max() < 1e-5


@pytest.mark.parametrize("change,needle", [
    (dict(num_labels=3), "num_labels is 3"),
    (dict(activation="torch.nn.modules.activation.Tanh"), "activation_fn"),
    (dict(pair=False), "does not encode a pair"),
])
def test_load_errors_name_the_problem(tmp_path, change, needle):
    path = tmp_path / "1"
    write_tiny_cross_encoder(path, **change)
    with pytest.raises(ConfigError) as e:
        served(path)
    assert needle in e.value.message


def test_mis_shaped_classifier_and_embedding_checkpoint_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from models import write_tiny_bert

    path = tmp_path / "1"
    write_tiny_cross_encoder(path)
    f = path / "model.safetensors"
    t = load_file(str(f))
    t["classifier.weight"] = torch.zeros(1, 16)
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"classifier.weight' has shape \[1, 16\]"):
        served(path)
    emb = tmp_path / "emb" / "1"
    write_tiny_bert(emb)
    (emb / "config.json").write_text(json.dumps({**json.loads((emb / "config.json").read_text()),
                                                 "architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="not supported for cross-encoders"):
        served(emb)


def test_queued_requests_share_forwards_and_close_answers_503(tiny):
    _, _, model = tiny
    model = served(tiny[0], max_batch_size=8)
    ps = pairs()[:10]

    async def main():
        tasks = [asyncio.ensure_future(model.score_pairs([p])) for p in ps]
        await asyncio.sleep(0)  # all ten are queued before the worker starts
        model.start()
        out = await asyncio.gather(*tasks)
        await model.close()
        with pytest.raises(Unavailable):
            await model.score_pairs([ps[0]])
        return out

    out = asyncio.run(main())
    assert model.num_batches == 2 and model.num_pairs == 10  # 8 pairs from 8 requests, then 2
    alone = _ours(tiny[2])[:10]
    for (scores, num_tokens), ref, p in zip(out, alone, ps):
        assert scores.shape == (1,) and abs(scores[0] - ref) < 1e-5
        assert num_tokens == len(model.encode([p])[0].ids)


def test_an_embedding_model_on_a_cross_encoder_checkpoint_names_the_backend(tiny):
    from rtserve.models.embedding import EmbeddingModel

    config = ModelConfig.from_dict("emb", {"backend": "embedding", "device": "cpu", "warmup": False})
    with pytest.raises(ConfigError, match="serve it with backend: cross_encoder"):
        EmbeddingModel(config, tiny[0].parent, 1)


def test_forwards_are_cut_where_padding_would_dominate(tiny, monkeypatch):
    import rtserve.models.cross_encoder as ce

    _, _, model = tiny
    short, long = ("x", "y"), ("hello", LONG)  # 5 and 40 tokens
    b0 = model.num_batches
    together = model._run(model.encode([short, short, short]))
    assert model.num_batches == b0 + 1  # 0 padding
    monkeypatch.setattr(ce, "MIN_PAD_WASTE", 8)
    scores = model._run(model.encode([long, short, short]))
    assert model.num_batches == b0 + 3  # [short, short], [long]: padding 2 x 35 tokens would be 82% of the forward
    assert np.abs(scores[1:] - together[:2]).max() < 1e-5
