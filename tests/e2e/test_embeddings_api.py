"""/v1/embeddings end to end: the real server on loopback, the unmodified openai client, a tiny
random BERT with a WordPiece tokenizer trained here, checked against our encoder run directly."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

from servers import start_server  # noqa: E402
from models import LM_TEXT, write_text_lm  # noqa: E402

pytestmark = pytest.mark.timeout(180)
MAX_TOKENS = 48


def write_tiny_bert(path: Path) -> Path:
    """A random BertModel with a lower-casing WordPiece tokenizer ([CLS] ... [SEP]) and a
    ``model_max_length`` below its positions, so the server's limit comes from tokenizer_config."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(LM_TEXT, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_TOKENS}))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("embrepo")
    write_tiny_bert(repo / "emb" / "1")
    (repo / "emb" / "model.yaml").write_text("backend: embedding\ndevice: cpu\nmax_batch_size: 8\n")
    write_text_lm(repo / "lm" / "1")
    (repo / "lm" / "model.yaml").write_text("backend: llm\ndevice: cpu\nengine:\n  num_blocks: 32\n  block_size: 4\n"
                                            "  max_model_len: 64\n")
    with start_server(repo, repo.parent, "--log-level", "warning") as srv:
        url = srv.url
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), Reference(repo / "emb" / "1"), url


class Reference:
    """Our encoder run directly, one input at a time (no batching, no padding)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        from rtserve.llm.models.bert import load_bert

        self.model, self.tok = load_bert(path), Tokenizer.from_file(str(path / "tokenizer.json"))

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def vector(self, text_or_ids) -> np.ndarray:
        import torch

        from rtserve.llm.models.bert import PoolingConfig, pool

        ids = torch.tensor([self.ids(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids])
        mask = torch.ones_like(ids, dtype=torch.bool)
        with torch.inference_mode():
            return pool(self.model(ids, mask), mask, PoolingConfig()).numpy()[0]


def test_models_lists_both_kinds(server):
    client, _, _ = server
    assert sorted(m.id for m in client.models.list().data) == ["emb", "lm"]


def test_single_string_list_and_token_ids(server):
    client, ref, _ = server
    r = client.embeddings.create(model="emb", input="The quick brown fox", encoding_format="float")
    assert r.object == "list" and r.model == "emb" and len(r.data) == 1 and r.data[0].index == 0
    assert np.allclose(r.data[0].embedding, ref.vector("The quick brown fox"), atol=1e-5)
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5
    assert r.usage.prompt_tokens == r.usage.total_tokens == len(ref.ids("The quick brown fox"))

    texts = ["hello world", "def serve(model):", "snow " * 10]
    r = client.embeddings.create(model="emb", input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    for d, t in zip(r.data, texts):
        assert np.allclose(d.embedding, ref.vector(t), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(ref.ids(t)) for t in texts)

    ids = ref.ids("hello world")
    one = client.embeddings.create(model="emb", input=ids, encoding_format="float")
    assert np.allclose(one.data[0].embedding, ref.vector("hello world"), atol=1e-5)
    assert one.usage.prompt_tokens == len(ids)
    many = client.embeddings.create(model="emb", input=[ids, [5, 6, 7]], encoding_format="float")
    assert np.allclose(many.data[1].embedding, ref.vector([5, 6, 7]), atol=1e-5)


def test_base64_equals_float(server):
    client, _, url = server
    texts = ["hello world", "The quick brown fox"]
    floats = client.embeddings.create(model="emb", input=texts, encoding_format="float")
    decoded = client.embeddings.create(model="emb", input=texts)  # the client asks for base64 and decodes it
    for a, b in zip(floats.data, decoded.data):
        assert np.array_equal(np.float32(a.embedding), np.float32(b.embedding))
    raw = httpx.post(url + "/v1/embeddings", json={"model": "emb", "input": "hello world",
                                                    "encoding_format": "base64", "user": "me", "dimensions": 32}).json()
    assert isinstance(raw["data"][0]["embedding"], str)


@pytest.mark.parametrize("kw,status,needle", [
    (dict(model="nope", input="x"), 404, "does not exist"),
    (dict(model="emb", input=""), 400, "empty string"),
    (dict(model="emb", input=["a", ""]), 400, "input[1] is an empty string"),
    (dict(model="emb", input=[]), 400, "must not be empty"),
    (dict(model="emb", input=3), 400, "'input' must be"),
    (dict(model="emb", input=["a", 3]), 400, "'input' must be"),
    (dict(model="emb", input=[[1, 2], []]), 400, "input[1]"),
    (dict(model="emb", input=[1, 99999]), 400, "vocabulary size"),
    (dict(model="emb", input=["x"] * 2049), 400, "at most 2048"),
    (dict(model="emb", input="snow " * 60), 400, f"at most {MAX_TOKENS} tokens"),
    (dict(model="emb", input="x", dimensions=8), 400, "'dimensions' must be 32"),
    (dict(model="emb", input="x", encoding_format="int8"), 400, "encoding_format"),
    (dict(model="lm", input="x"), 400, "use /v1/completions"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, kw, status, needle):
    client, _, url = server
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(**kw)
    assert e.value.status_code == status and needle in e.value.message
    assert client.embeddings.create(model="emb", input="ok").data[0].embedding


def test_completions_on_an_embedding_model_is_400_naming_the_endpoint(server):
    client, _, url = server
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="emb", prompt="x")
    assert "/v1/embeddings" in e.value.message
    r = httpx.post(url + "/v1/embeddings", content=b"{not json")
    assert r.status_code == 400 and "message" in r.json()["error"]


def test_concurrent_requests_are_batched_and_equal_single_results(server):
    client, ref, url = server
    words = "the quick brown fox jumps over the lazy dog while snow falls on the model server".split()
    inputs = [" ".join(words[i:i + 1 + i % 7]) for i in range(16)]
    single = [np.float32(client.embeddings.create(model="emb", input=t, encoding_format="float").data[0].embedding)
              for t in inputs]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda t: client.embeddings.create(model="emb", input=[t, t.upper()]), inputs))
    for r, s, t in zip(got, single, inputs):
        assert np.abs(np.float32(r.data[0].embedding) - s).max() < 1e-5
        assert np.abs(np.float32(r.data[1].embedding) - s).max() < 1e-5  # lower-casing tokenizer: same ids
    text = httpx.get(url + "/metrics").text
    assert 'rtserve_embedding_requests_total{model="emb",outcome="success"}' in text
    assert 'rtserve_embedding_batches_total{model="emb"}' in text


def test_queued_requests_share_forwards_in_process(tmp_path):
    """Deterministic batching: requests queued before the worker starts are taken together, up to
    max_batch_size inputs per forward, and each gets its own vectors back."""
    import asyncio

    from rtserve.config import ModelConfig
    from rtserve.models.embedding import EmbeddingModel
    from rtserve.errors import Unavailable

    ref = Reference(write_tiny_bert(tmp_path / "emb" / "1"))
    config = ModelConfig.from_dict("emb", {"backend": "embedding", "device": "cpu", "max_batch_size": 8,
                                           "warmup": False})
    model = EmbeddingModel(config, tmp_path / "emb", 1)
    inputs = [ref.ids(" ".join(["snow"] * (1 + i))) for i in range(10)]

    async def main():
        tasks = [asyncio.ensure_future(model.embed([ids])) for ids in inputs]
        await asyncio.sleep(0)  # all ten are queued before the worker starts
        model.start()
        out = await asyncio.gather(*tasks)
        await model.close()
        with pytest.raises(Unavailable):
            await model.embed([inputs[0]])
        return out

    out = asyncio.run(main())
    assert model.num_batches == 2 and model.num_inputs == 10  # 8 + 2
    for vec, ids in zip(out, inputs):
        assert vec.shape == (1, 32) and np.abs(vec[0] - ref.vector(ids)).max() < 1e-5
