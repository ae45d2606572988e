"""Draft proposals from the MTP tail for self-speculative decoding: the base class that each
objective's drafter (declared beside the objective in model/mtp/) builds on.

State shared with the verifier (`speculative.py`), per sequence b:
* `tokens[b, :m_b+1]` are final: m_b is the index of the newest token, which the main model has
  not processed yet; the main model's cache holds positions 0..m_b-1.
* `trunk[b, i]` / `normed[b, i]`: the main model's last-block output and its final-norm output at
  position i (true for i < m_b).
`catch_up(m)` brings the drafter's own caches up to date for positions < m and returns the drafts
for tokens m+1..m+D ([B, D]) plus, when sampling, the draft distributions ([B, D, V]).

With `static=True` every window has a fixed width (the most that one round can add) and attends
over the whole cache through the position mask, so a round has the same shapes every time and no
host synchronisation: the speculative decoder then captures it as a device graph. The drafter's
state is updated in place for the same reason (a replay writes the addresses seen at capture).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.generation.sampling import SamplingConfig, probabilities, sample
from model.kv_cache import KVCache

if TYPE_CHECKING:
    from model.transformer import MTPLanguageModel


def rows_at(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """t [B, S, d] gathered at positions [B, W] → [B, W, d]."""
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


def put_rows(t: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
    t.scatter_(1, positions[..., None].expand(-1, -1, t.shape[-1]), rows)


class Drafter:
    """Drafts for one batch. Subclasses implement `catch_up` (see the module docstring) and read
    their objective's modules as `self.model.tail.objective`."""

    def __init__(self, model: MTPLanguageModel, batch: int, max_len: int, sampling: SamplingConfig,
                 generator: torch.Generator | None):
        self.model = model
        self.depth = model.config.mtp.depth
        self.sampling = sampling
        self.generator = generator
        self.max_len = max_len
        self.device = model.embedding.output_weight.device
        self.batch = batch
        self.dtype = model.embedding.output_weight.dtype
        self.static = False
        """Fixed window widths and whole-cache attention (set by the decoder once the prompt has
        been caught up; see the module docstring)."""

    def _block_caches(self, blocks) -> list[KVCache]:
        """One single-layer KV cache per draft block (an MTP module's or a head's)."""
        hd = self.model.config.model.head_dim
        return [KVCache(1, self.batch, blk.attn.groups, self.max_len, hd, self.dtype, self.device)
                for blk in blocks]

    def _pick(self, logits: torch.Tensor):
        """[B, V] → (tokens [B], probs [B, V] or None)."""
        if self.sampling.greedy:
            return logits.argmax(dim=-1), None
        probs = probabilities(logits.cpu(), self.sampling)
        return sample(probs, self.generator).to(self.device), probs

    def _window(self, start: torch.Tensor, m: torch.Tensor, static_width: int):
        """Positions [B, W] from start_b to m_b - 1, each sequence's last index in it, and the
        cache length to attend. Windows are padded to a common width by running on past
        m_b - 1: those rows are computed and ignored, and the cache entries they write lie at
        positions ≥ m_b, which are recomputed before anything attends them. Dynamic: W is the
        longest window; static: W = `static_width` (an upper bound) and the whole cache."""
        if self.static:
            width, attend = static_width, self.max_len
        else:
            width = int((m - start).max())
            attend = int((start + width).max())
        offsets = torch.arange(width, device=self.device)
        # The clamp only touches padding rows: real positions stay below max_len - 1.
        positions = (start[:, None] + offsets).clamp(max=self.max_len - 1)  # [B, W]
        last = m - 1 - start  # [B] index of position m_b - 1 in the window
        return positions, last, attend

    def catch_up(self, tokens: torch.Tensor, trunk: torch.Tensor, normed: torch.Tensor,
                 m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @staticmethod
    def _stacked(drafts: list[torch.Tensor], probs: list[torch.Tensor | None]):
        """Per-depth picks → (drafts [B, D], draft probabilities [B, D, V] or None)."""
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs[0] is not None else None)
