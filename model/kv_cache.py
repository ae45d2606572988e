"""Key/value caches for incremental decoding, with ragged per-sequence lengths.

A `KVCache` serves one stack of attention layers (the main model, or one MTP module/head). Each
layer's keys and values live in one fixed buffer [B, S, Hkv, 2, hd]; each sequence's tokens are
written at their absolute positions, and a query at position p attends to the keys at positions
≤ p. Rolling a sequence back (rejected drafts) is just lowering its length: stale entries beyond
it are never attended (they lie after every later query's position until they are overwritten).
The same holds across requests: a new request overwrites the positions it attends before
attending them, so a cache is reused from request to request without clearing.

What every layer of one forward pass shares — the positions, the rotary rows for them and the
attention mask — is built once per pass (`StepInputs`), not once per layer: a decoding step of a
small model is a few hundred tiny kernels, and these would otherwise be a tenth of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.attention import Attention


@dataclass
class StepInputs:
    """What the layers of one cached forward pass share."""

    positions: torch.Tensor
    """[B, T] absolute positions of the tokens being processed."""
    cos: torch.Tensor
    """[B, T, 1, q_per_group + 2, hd] rotary cosines for the fused [q.., k, v] slots of a
    key/value group (1 in the value slot, so one rotation pass leaves v as it is)."""
    sin: torch.Tensor
    """[B, T, 1, q_per_group + 2, hd] rotary sines, signed for `roll` (0 in the value slot)."""
    mask: torch.Tensor
    """[B, 1, T · q_per_group, attend_len] additive mask (0 or -inf) in the compute dtype, one row
    per (token, query head of a group): the grouped query heads are folded into the rows."""

    @property
    def attend_len(self) -> int:
        """Keys [0, attend_len) may be attended (≥ max position + 1; rounds attend the whole
        cache). A tensor size, not a stored int: compiled regions see it as a dynamic size."""
        return self.mask.shape[-1]


@dataclass
class LayerCache:
    """One layer's cache buffer and the pass's shared inputs: what `Attention` reads."""

    kv: torch.Tensor
    """[B, S, Hkv, 2, hd] keys (slot 0) and values (slot 1) at absolute positions."""
    rows: torch.Tensor
    """[B, 1] batch row indices (for the scatter of new entries)."""
    step: StepInputs

    @property
    def positions(self) -> torch.Tensor:
        return self.step.positions

    def write(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store kv [B, T, Hkv, 2, hd] at the step's positions; return the attendable keys and
        values as [B, Hkv, attend_len, hd] views."""
        self.kv[self.rows, self.step.positions] = kv
        live = self.kv[:, : self.step.attend_len]  # [B, S', Hkv, 2, hd]
        return live[..., 0, :].transpose(1, 2), live[..., 1, :].transpose(1, 2)


class KVCache:
    """The caches of `num_layers` attention layers shaped like `attn` (a layer of the stack: its
    key/value groups, head size and rotary tables)."""

    def __init__(self, attn: Attention, num_layers: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.attn = attn
        shape = (batch, max_len, attn.groups, 2, attn.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows = torch.arange(batch, device=device)[:, None]
        self.keys_index = torch.arange(max_len, device=device)  # key positions, for masks
        self.max_len, self.dtype = max_len, dtype

    def keys(self, layer: int) -> torch.Tensor:
        """[B, Hkv, S, hd] view of a layer's keys (tests, inspection)."""
        return self.kv[layer][..., 0, :].transpose(1, 2)

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer][..., 1, :].transpose(1, 2)

    def step(self, positions: torch.Tensor, attend_len: int) -> StepInputs:
        """The shared inputs of a pass over tokens at `positions` [B, T] attending
        [0, attend_len)."""
        if attend_len > self.max_len:
            raise ValueError(f"cache of {self.max_len} positions cannot attend {attend_len}")
        # One layout for every caller (a prefill's positions are a broadcast view): compiled
        # regions guard on strides, and would otherwise compile once per layout.
        positions = positions.contiguous()
        qpg = self.attn.q_per_group
        cos_t, sin_t = self.attn.rotary.slot_tables(positions.device, self.dtype, qpg + 1, 1)
        cos = cos_t[positions].unsqueeze(2)  # [B, T, 1, qpg+2, hd]
        sin = sin_t[positions].unsqueeze(2)
        rows = positions if qpg == 1 else positions.repeat_interleave(qpg, dim=1)  # [B, T·qpg]
        hidden = self.keys_index[None, None, :attend_len] > rows[..., None]  # [B, T·qpg, S']
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=positions.device)
        mask.masked_fill_(hidden, float("-inf"))
        return StepInputs(positions, cos, sin, mask.unsqueeze(1))

    def layers(self, positions: torch.Tensor, attend_len: int) -> list[LayerCache]:
        """Every layer's cache for one pass, sharing one `StepInputs`."""
        step = self.step(positions, attend_len)
        return [LayerCache(kv, self.rows, step) for kv in self.kv]

    def layer(self, i: int, positions: torch.Tensor, attend_len: int) -> LayerCache:
        return self.layer_for(i, self.step(positions, attend_len))

    def layer_for(self, i: int, step: StepInputs) -> LayerCache:
        """Layer i's cache for a pass whose shared inputs were built already (by any cache of
        layers shaped like this one's)."""
        return LayerCache(self.kv[i], self.rows, step)
