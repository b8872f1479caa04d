"""A BERT cross-encoder: Hugging Face's ``BertForSequenceClassification`` with one label, which
reads a (query, document) pair as ``[CLS] q [SEP] d [SEP]`` (token types 0 then 1) and scores it.

score = activation(classifier(tanh(pooler.dense(h[CLS])))), the encoder being ``bert.BertModel``.
The activation is the one sentence-transformers' ``CrossEncoder.predict`` applies: the class named
by ``config.json``'s ``sentence_transformers.activation_fn`` (or the older
``sbert_ce_default_activation_function``), else ``Sigmoid`` for a one-label model. Knows nothing of
tokenizers or serving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import load_weights
from .bert import BertModel, EncoderConfig

ARCHITECTURES = ("BertForSequenceClassification",)
#: sentence-transformers' activation classes (by their last dotted name) -> ours
ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Identity": lambda x: x}
_NOT_WEIGHTS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


@dataclass(frozen=True)
class ClassifierConfig:
    """The encoder's architecture, plus the head: how many labels and the score's activation."""

    encoder: EncoderConfig
    num_labels: int = 1
    activation: str = "Sigmoid"  # a key of ACTIVATIONS

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        encoder = EncoderConfig.from_dict(d, ARCHITECTURES, purpose="cross-encoders")
        # transformers writes id2label (one entry per label); num_labels when set explicitly; 2 by default
        num_labels = int(d.get("num_labels") or len(d.get("id2label") or {}) or 2)
        if num_labels != 1:
            raise ValueError(f"config.json: num_labels is {num_labels}; a cross-encoder is served with one label "
                             "(one relevance logit per pair), so a classifier of several labels (e.g. NLI) is "
                             "not served")
        st = d.get("sentence_transformers") or {}
        path = st.get("activation_fn") or d.get("sbert_ce_default_activation_function") or "Sigmoid"
        activation = str(path).rsplit(".", 1)[-1]
        if activation not in ACTIVATIONS:
            raise ValueError(f"config.json: activation_fn '{path}' is not supported; supported: "
                             f"torch.nn.Sigmoid (the default) or torch.nn.Identity (raw logits)")
        return cls(encoder, num_labels, activation)

    @classmethod
    def from_dir(cls, path: Path | str) -> "ClassifierConfig":
        p = Path(path) / "config.json"
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ValueError(f"{p} is missing") from None


class BertPooler(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H): the [CLS] position


class BertForSequenceClassification(nn.Module):
    """Module names follow Hugging Face's, except the pooler: ``bert.pooler.*`` is ``pooler.*`` here
    (our ``BertModel`` has none)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config.encoder)
        self.pooler = BertPooler(config.encoder)
        self.classifier = nn.Linear(config.encoder.hidden_size, config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, bool mask and token types -> (B,) float32 scores, the activation applied."""
        logits = self.classifier(self.pooler(self.bert(input_ids, attention_mask, token_type_ids)))  # (B, 1)
        return ACTIVATIONS[self.config.activation](logits.float()[:, 0])


def checkpoint_name(stored: str) -> str | None:
    """A checkpoint tensor's name in our module (None: a buffer, not a weight)."""
    if stored in _NOT_WEIGHTS:
        return None
    if stored.startswith("bert.pooler."):
        return stored.removeprefix("bert.")
    return stored


def load_cross_encoder(path: Path | str, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> BertForSequenceClassification:
    """Build on the meta device, then fill from ``path``'s safetensors (every name and shape checked:
    encoder, pooler and classifier). ValueError naming an unsupported field or a missing,
    unexpected or mis-shaped tensor."""
    config = ClassifierConfig.from_dir(path)
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    load_weights(model, Path(path), dtype, torch.device(device), rename=checkpoint_name)
    return model.eval()
