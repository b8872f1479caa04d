"""Rotary position embeddings (non-interleaved halves, as the Llama family uses), with the
scaling variants their configs name: default, linear, llama3."""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, out).float()
    raise ValueError(f"config.json: rope scaling '{kind}' is not supported (default, linear, llama3)")


class Rotary(torch.nn.Module):
    """cos/sin tables for positions 0..max_positions-1; ``forward`` rotates q and k in place of copies."""

    def __init__(self, head_dim: int, theta: float, scaling: dict, max_positions: int,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        # explicit device: real tables even when the model is built under torch.device("meta")
        inv = inv_frequencies(head_dim, theta, scaling).to(device)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        h = head_dim // 2
        sin = emb.sin()
        self.register_buffer("cos", emb.cos(), persistent=False)  # (P, D)
        # sin with the first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin
        self.register_buffer("signed_sin", torch.cat([-sin[:, :h], sin[:, h:]], dim=-1), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for the step's positions, (T, 1, D): looked up once per step, used by
        every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
               out: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., H, D), any number of heads (q and k together when they are adjacent). Three ops
        (mul, flip, addcmul) instead of seven; ``out`` may be ``x`` itself (rotate in place: the
        inputs of the last op are temporaries)."""
        cos, signed_sin = tables
        swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
        return torch.addcmul(x * cos, swapped, signed_sin, out=out)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: (T, Hq, D), k: (T, Hkv, D); positions: (T,)
        tables = self.tables(positions, q.dtype)
        return self.rotate(q, tables), self.rotate(k, tables)
