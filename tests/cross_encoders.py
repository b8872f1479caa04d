"""Tiny random cross-encoders for tests: a transformers ``BertForSequenceClassification`` with one
label, saved with a WordPiece tokenizer trained here (BERT's pair post-processor) and a
``model_max_length`` below its positions, so truncation shows. Never downloads anything."""
from __future__ import annotations

import json
from pathlib import Path

from models import LM_TEXT

MAX_LENGTH = 40  # tokenizer_config.json's model_max_length (the model has 64 positions)
WORDS = ("the quick brown fox jumps over the lazy dog while snow falls on the model server "
         "def serve return infer batch requests real time hello world").split()


def write_wordpiece(path: Path, pair: bool = True, max_length: int = MAX_LENGTH) -> None:
    """``tokenizer.json`` (lower-casing WordPiece; ``[CLS] q [SEP] d [SEP]`` for pairs unless
    ``pair`` is False) and ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(LM_TEXT, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = (processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2)) if pair else
                          processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)]))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": max_length, "tokenizer_class": "BertTokenizer", "do_lower_case": True,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))


def write_tiny_cross_encoder(path: Path, std: float = 0.3, seed: int = 0, activation: str | None = None,
                             pair: bool = True, max_length: int = MAX_LENGTH, **config):
    """Weights drawn N(0, ``std``) (LayerNorm scales N(1, 0.1)) so that scores spread (the default
    init gives logits near 0);
    ``activation``: a ``sentence_transformers.activation_fn`` to write into config.json. Returns
    the transformers model (eval mode)."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    write_wordpiece(path, pair, max_length)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, num_labels=1)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**{**cfg, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:  # near 1, so the states keep their spread
                p.normal_(1, 0.1)
            else:
                p.normal_(0, std)
    model.save_pretrained(path, safe_serialization=True)
    if activation is not None:
        c = json.loads((path / "config.json").read_text())
        c["sentence_transformers"] = {"activation_fn": activation}
        (path / "config.json").write_text(json.dumps(c))
    return model


def sentences(n: int, seed: int = 0, min_words: int = 1, max_words: int = 12) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]
