"""Meta's parallel heads (Gloeckle et al. 2024): independent transformer-block heads on a shared
trunk, each followed by the shared final norm and head. Head 1 is the main model's own next-token
path; the D extra heads here predict t_{i+1+j} for j = 1..D. No causal chain between heads."""

from __future__ import annotations

import torch
from torch import nn

from model.block import TransformerBlock
from model.config import DecoderConfig
from model.generation.drafters import Drafter, rows_at
from model.mtp.objective import MTPObjective, TailInputs
from model.parallel import ParallelContext


class ParallelHeadsDrafter(Drafter):
    """Head j (a transformer block with its own cache over the trunk outputs) at the last
    position drafts t_{m+j}; no dependence on drafted tokens, so nothing to roll back."""

    def __init__(self, *args):
        super().__init__(*args)
        self.caches = self._block_caches(self.model.tail.objective.heads)
        self.valid = torch.zeros(self.batch, dtype=torch.long, device=self.device)

    def catch_up(self, tokens, trunk, normed, m):
        positions, last = self._window(self.valid, m, self.drafts + 1)
        h_in = rows_at(trunk, positions)
        step = self.caches[0].step(positions, self.max_len)  # the heads share positions
        drafts, probs = [], []
        for j, head in enumerate(self.model.tail.objective.heads[: self.drafts]):
            h = head(h_in, self.caches[j].layer_for(0, step))
            tok, p = self._pick(self.model.tail.final_norm(h[self.rows, last]))
            drafts.append(tok)
            probs.append(p)
        self.valid.copy_(m)
        return self._stacked(drafts, probs)


class ParallelHeadsMTP(MTPObjective, kind="parallel"):
    shares_with_main_model = ("model.norm (shared final norm)", "lm_head (shared head)")
    drafter = ParallelHeadsDrafter

    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__(dcfg, ctx)
        self.heads = nn.ModuleList(
            TransformerBlock(dcfg.model, ctx) for _ in range(dcfg.mtp.depth))

    def depth_hiddens(self, x: TailInputs) -> list[tuple[int, torch.Tensor]]:
        # Heads read the trunk's residual stream (before the final norm), as the main path does.
        return [(j, x.final_norm(head(x.trunk, None, x.mask)))
                for j, head in enumerate(self.heads, start=1)]
