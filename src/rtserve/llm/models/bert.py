"""A BERT encoder for sentence embeddings (all-MiniLM and friends): token ids -> hidden states ->
pooled, optionally L2-normalised vectors.

Module names follow Hugging Face's ``BertModel`` so a safetensors checkpoint maps by name through
``weights.load_weights``; padded batches are masked in attention, so a sequence's output does not
depend on what it is batched with. Knows nothing of tokenizers or serving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...paths import confined
from ..weights import load_weights

ARCHITECTURES = ("BertModel",)
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
# Stored in some checkpoints but not weights: buffers of HF's BertEmbeddings, and the pooler
# (tanh over [CLS], used by next-sentence prediction, never by sentence-embedding pooling).
_NOT_WEIGHTS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclass(frozen=True)
class EncoderConfig:
    """A BERT encoder's architecture, read from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"config.json: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act '{self.hidden_act}' is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: dict, architectures: tuple[str, ...] = ARCHITECTURES,
                  purpose: str = "embeddings") -> "EncoderConfig":
        """``architectures``: the ``config.json`` architectures accepted (the first is assumed for a
        config that names none but has ``model_type: bert``); ``purpose`` names the use in errors."""
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in architectures), None)
        if arch is None and not archs and d.get("model_type") == "bert":
            arch = architectures[0]
        if arch is None:
            hint = (" (a sequence-classification checkpoint is a cross-encoder: serve it with backend: cross_encoder)"
                    if "BertForSequenceClassification" in archs else "")
            raise ValueError(f"config.json: architecture {archs or d.get('model_type')} is not supported for "
                             f"{purpose}; supported: {', '.join(architectures)} (model_type bert){hint}")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"config.json: position_embedding_type '{pos}' is not supported; supported: absolute")

        def need(key):
            if key not in d:
                raise ValueError(f"config.json: missing field '{key}'")
            return d[key]

        return cls(
            architecture=arch, vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")),
            num_layers=int(need("num_hidden_layers")), num_heads=int(need("num_attention_heads")),
            intermediate_size=int(need("intermediate_size")),
            max_position_embeddings=int(need("max_position_embeddings")),
            type_vocab_size=int(d.get("type_vocab_size", 2)), layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_act=str(d.get("hidden_act", "gelu")), pad_token_id=int(d.get("pad_token_id") or 0),
        )

    @classmethod
    def from_dir(cls, path: Path | str, **kw) -> "EncoderConfig":
        p = Path(path) / "config.json"
        try:
            return cls.from_dict(json.loads(p.read_text()), **kw)
        except FileNotFoundError:
            raise ValueError(f"{p} is missing") from None


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: sentence-transformers' ``modules.json`` and
    ``1_Pooling/config.json`` when present, else mean pooling + L2 normalisation (what the
    sentence-embedding BERTs we serve were trained with)."""

    mode: str = "mean"  # mean | cls
    normalize: bool = True

    @staticmethod
    def modules(path: Path | str) -> tuple[bool, Path | None]:
        """From ``modules.json`` (when there is one): whether a Normalize module follows, and the
        Pooling module's ``config.json`` (its folder must stay inside ``path``; None without one)."""
        path = Path(path)
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return True, None
        modules = json.loads(modules_file.read_text())
        types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        pooling = types.get("Pooling")
        if not pooling:
            return "Normalize" in types, None
        folder = confined(path, pooling.get("path") or "1_Pooling", f"{modules_file}: Pooling path",
                          allow_symlinks=True)
        return "Normalize" in types, folder / "config.json"

    @classmethod
    def from_dir(cls, path: Path | str) -> "PoolingConfig":
        normalize, pooling_file = cls.modules(path)
        if pooling_file is None or not pooling_file.is_file():
            return cls("mean", normalize)
        p = json.loads(pooling_file.read_text())
        modes = [k for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                             "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                             "pooling_mode_lasttoken") if p.get(k)]
        if modes not in (["pooling_mode_cls_token"], ["pooling_mode_mean_tokens"]):
            raise ValueError(f"{pooling_file}: pooling {modes or 'none'} is not supported; "
                             "supported: pooling_mode_mean_tokens or pooling_mode_cls_token alone")
        return cls("cls" if modes == ["pooling_mode_cls_token"] else "mean", normalize)


class BertEmbeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # None: one segment, every token has token type 0; (B, T) segment ids for sentence pairs
        types = (self.token_type_embeddings.weight[0] if token_type_ids is None
                 else self.token_type_embeddings(token_type_ids))
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + types
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.nh, self.hd = c.num_heads, c.hidden_size // c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.nh, self.hd).transpose(1, 2) for p in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd); mask (B, 1, 1, T)
        return out.transpose(1, 2).reshape(b, t, h)


class BertSelfOutput(nn.Module):
    """Projection, residual, LayerNorm (used after attention and after the feed-forward)."""

    def __init__(self, c: EncoderConfig, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))


class BertModel(nn.Module):
    """Hugging Face ``BertModel`` without the pooler; ``forward`` returns the last hidden states."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) int64, attention_mask (B, T) bool, True on real tokens, token_type_ids
        (B, T) int64 or None (all 0) -> (B, T, H)."""
        mask = attention_mask[:, None, None, :]  # (B, 1, 1, T): padding keys get no weight
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: PoolingConfig) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) bool mask -> (B, H) sentence vectors, in float32."""
    hidden = hidden.float()
    if pooling.mode == "cls":
        out = hidden[:, 0]
    else:  # mean over real tokens only: padding must not change a sentence's vector
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return F.normalize(out, p=2, dim=-1) if pooling.normalize else out


def checkpoint_name(stored: str) -> str | None:
    """A checkpoint tensor's name in our module: drop the ``bert.`` prefix of checkpoints saved
    from a task head; None for tensors that are not weights of the encoder (skipped)."""
    name = stored.removeprefix("bert.")
    if name in _NOT_WEIGHTS or name.startswith("pooler."):
        return None
    return name


def load_bert(path: Path | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BertModel:
    """Build on the meta device, then fill from ``path``'s safetensors (memory-mapped, every name
    and shape checked). Raises ValueError naming an unsupported field or a missing/mis-shaped tensor."""
    path = Path(path)
    config = EncoderConfig.from_dir(path)
    with torch.device("meta"):
        model = BertModel(config)
    load_weights(model, path, dtype, torch.device(device), rename=checkpoint_name)
    return model.eval()
