"""Blockwise parallel decoding heads (Stern et al. 2018): hⱼ = z + FFNⱼ(z) on the decoder output z
(after the final norm), scored by the shared head. p₁ is the base model's own head.

FFN output projections start at zero, so every extra head starts as a copy of p₁ — the natural
starting point when training on a frozen base.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from model.config import DecoderConfig
from model.embedding import SharedEmbedding
from model.init import zero_init
from model.mlp import SwiGLU
from model.parallel import ParallelContext


class BlockwiseMTP(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__()
        self.sample_one_loss = dcfg.mtp.sample_one_loss
        self.heads = nn.ModuleList(
            SwiGLU(dcfg.model, ctx, out_init=zero_init) for _ in range(dcfg.mtp.depth))

    def trained_depths(self, step: int) -> list[int]:
        """Depths (1-based) whose loss is computed at `step`: all, or one drawn from the step
        number so that every rank (TP, PP, DP) draws the same one without communicating."""
        if not self.sample_one_loss:
            return list(range(1, len(self.heads) + 1))
        return [1 + random.Random(step).randrange(len(self.heads))]

    def depth_hiddens(
        self, trunk: torch.Tensor, main: torch.Tensor, labels: torch.Tensor,
        shared: SharedEmbedding, final_norm: nn.Module, step: int,
    ) -> list[tuple[int, torch.Tensor]]:
        return [(j, main + self.heads[j - 1](main)) for j in self.trained_depths(step)]
