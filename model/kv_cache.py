"""Key/value caches for incremental decoding, with ragged per-sequence lengths.

A `KVCache` serves one stack of attention layers (the main model, or one MTP module/head). Keys
and values live in fixed buffers [B, Hkv, S, hd]; each sequence's tokens are written at their
absolute positions, and a query at position p attends to the keys at positions ≤ p. Rolling a
sequence back (rejected drafts) is just lowering its length: stale entries beyond it are never
attended (they lie after every later query's position until they are overwritten).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    keys: torch.Tensor  # [B, Hkv, S, hd]
    values: torch.Tensor  # [B, Hkv, S, hd]
    positions: torch.Tensor  # [B, T] absolute positions of the tokens being processed
    attend_len: int  # keys [0, attend_len) may be attended (host-side bound, ≥ max position + 1)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, hd] at `positions`; return the attendable keys and values."""
        idx = self.positions[:, None, :, None].expand_as(k)  # [B, Hkv, T, hd]
        self.keys.scatter_(2, idx, k)
        self.values.scatter_(2, idx, v)
        return self.keys[:, :, : self.attend_len], self.values[:, :, : self.attend_len]

    def mask(self) -> torch.Tensor:
        """[B, 1, T, attend_len] bool: key j is visible to the query at position p iff j ≤ p."""
        keys = torch.arange(self.attend_len, device=self.positions.device)
        return (keys[None, None, None, :] <= self.positions[:, None, :, None])


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    def layer(self, i: int, positions: torch.Tensor, attend_len: int) -> LayerCache:
        if attend_len > self.max_len:
            raise ValueError(f"cache of {self.max_len} positions cannot attend {attend_len}")
        return LayerCache(self.keys[i], self.values[i], positions, attend_len)
