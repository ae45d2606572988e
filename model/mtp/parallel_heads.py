"""Meta's parallel heads (Gloeckle et al. 2024): independent transformer-block heads on a shared
trunk, each followed by the shared final norm and head. Head 1 is the main model's own next-token
path; the D extra heads here predict t_{i+1+j} for j = 1..D. No causal chain between heads."""

from __future__ import annotations

import torch
from torch import nn

from model.block import TransformerBlock
from model.config import DecoderConfig
from model.embedding import SharedEmbedding
from model.parallel import ParallelContext


class ParallelHeadsMTP(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__()
        self.heads = nn.ModuleList(
            TransformerBlock(dcfg.model, ctx) for _ in range(dcfg.mtp.depth))

    def depth_hiddens(
        self, trunk: torch.Tensor, main: torch.Tensor, labels: torch.Tensor,
        shared: SharedEmbedding, final_norm: nn.Module, step: int,
    ) -> list[tuple[int, torch.Tensor]]:
        # Heads read the trunk's residual stream (before the final norm), as the main path does.
        return [(j, final_norm(head(trunk))) for j, head in enumerate(self.heads, start=1)]
