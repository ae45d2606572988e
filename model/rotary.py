"""Rotary position embeddings (Su et al. 2021), in the rotate-half layout used by Llama/HF."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables for positions [0, max_seq_len); `forward` rotates q and k."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        pos = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(pos, inv_freq)  # [S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, hd]
        # Buffers (not persistent): they follow .to(device) but are not checkpointed.
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, start: int = 0,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [B, H, T, hd] and k [B, Hkv, T, hd].

        Positions are start..start+T-1 (a slice of the tables: no host sync), or the explicit
        `positions` [B, T] (batched generation with per-sequence offsets; the caller bounds them).
        """
        if positions is None:
            end = start + q.shape[-2]
            if end > self.cos.shape[0]:
                raise ValueError(
                    f"sequence reaches position {end - 1} but model.max_seq_len = "
                    f"{self.cos.shape[0]}; raise model.max_seq_len or shorten the input")
            cos = self.cos[start:end].to(q.dtype)  # [T, hd]
            sin = self.sin[start:end].to(q.dtype)
        else:
            cos = self.cos[positions].to(q.dtype).unsqueeze(1)  # [B, 1, T, hd]
            sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        return q, k
