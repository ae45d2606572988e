"""Rotary position embeddings (Su et al. 2021), in the rotate-half layout used by Llama/HF."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position; cos/sin tables up to max_seq_len, built once per device.

    The tables are plain attributes, not buffers: casting the model to bf16 (as DeepSpeed does)
    must not round them, and they are derived data that checkpoints need not carry.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slot_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [max_seq_len, head_dim] on `device`."""
        if device not in self._tables:
            hd = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            pos = torch.arange(self.max_seq_len, dtype=torch.float64)
            freqs = torch.outer(pos, inv_freq)  # [S, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [S, hd]
            self._tables[device] = (emb.cos().float().to(device), emb.sin().float().to(device))
        return self._tables[device]

    def slot_tables(self, device: torch.device, dtype: torch.dtype, rotated: int,
                    unrotated: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_seq_len, rotated + unrotated, hd] in `dtype` for rotating `rotated`
        heads side by side and passing `unrotated` through (cos 1, sin 0), with sin signed so
        that x·cos + roll(x, hd/2)·sin equals `forward`'s x·cos + rotate_half(x)·sin value for
        value (−a·b = a·(−b) exactly). Decoding rotates a key/value group's [q.., k, v] in one
        pass this way (model.kv_cache.StepInputs)."""
        key = (device, dtype, rotated, unrotated)
        if key not in self._slot_tables:
            cos_t, sin_t = self.tables(device)
            half = self.head_dim // 2
            sign = torch.cat((-torch.ones(half, device=device), torch.ones(half, device=device)))
            cos = torch.cat((cos_t[:, None].expand(-1, rotated, -1),
                             torch.ones_like(cos_t)[:, None].expand(-1, unrotated, -1)), dim=1)
            sin = torch.cat(((sin_t * sign)[:, None].expand(-1, rotated, -1),
                             torch.zeros_like(sin_t)[:, None].expand(-1, unrotated, -1)), dim=1)
            self._slot_tables[key] = (cos.to(dtype).contiguous(), sin.to(dtype).contiguous())
        return self._slot_tables[key]

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
        cos_t, sin_t = self.tables(q.device)
        if positions is None:
            end = start + q.shape[-2]
            if end > self.max_seq_len:
                raise ValueError(
                    f"sequence reaches position {end - 1} but model.max_seq_len = "
                    f"{self.max_seq_len}; raise model.max_seq_len or shorten the input")
            cos = cos_t[start:end].to(q.dtype)  # [T, hd]
            sin = sin_t[start:end].to(q.dtype)
        else:
            cos = cos_t[positions].to(q.dtype).unsqueeze(1)  # [B, 1, T, hd]
            sin = sin_t[positions].to(q.dtype).unsqueeze(1)
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        return q, k
