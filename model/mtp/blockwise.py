"""Blockwise parallel decoding heads (Stern et al. 2018): hⱼ = z + FFNⱼ(z) on the decoder output z
(after the final norm), scored by the shared head. p₁ is the base model's own head.

FFN output projections start at zero, so every extra head starts as a copy of p₁ — the natural
starting point when training on a frozen base.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from model.config import DecoderConfig, MTPConfig
from model.generation.drafters import Drafter
from model.init import zero_init
from model.mlp import SwiGLU
from model.mtp.objective import MTPObjective, Option, TailInputs
from model.parallel import ParallelContext


class BlockwiseDrafter(Drafter):
    """hⱼ = z + FFNⱼ(z) at the last position; stateless."""

    def catch_up(self, tokens, trunk, normed, m):
        z = normed[self.rows, m - 1]  # [B, d]
        drafts, probs = [], []
        for head in self.model.tail.objective.heads[: self.drafts]:
            tok, p = self._pick(z + head(z))
            drafts.append(tok)
            probs.append(p)
        return self._stacked(drafts, probs)


class BlockwiseMTP(MTPObjective, kind="blockwise"):
    options = {
        "freeze_trunk": Option(False, "freeze the base model (embedding, blocks, final norm, "
                                      "head); only the extra FFN heads train (BPD's frozen-base "
                                      "setting)"),
        "sample_one_loss": Option(False, "per step, train one extra head chosen from the step "
                                         "number instead of all D (BPD's memory saving); the "
                                         "choice is identical on every rank"),
    }
    drafter = BlockwiseDrafter

    @classmethod
    def freezes_trunk(cls, mtp: MTPConfig) -> bool:
        return mtp.option("freeze_trunk")

    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__(dcfg, ctx)
        self.sample_one_loss = dcfg.mtp.option("sample_one_loss")
        self.heads = nn.ModuleList(
            SwiGLU(dcfg.model, ctx, out_init=zero_init) for _ in range(dcfg.mtp.depth))

    def trained_depths(self, step: int) -> list[int]:
        """Depths (1-based) whose loss is computed at `step`: all, or one drawn from the step
        number so that every rank (TP, PP, DP) draws the same one without communicating."""
        if not self.sample_one_loss:
            return list(range(1, len(self.heads) + 1))
        return [1 + random.Random(step).randrange(len(self.heads))]

    def depth_hiddens(self, x: TailInputs) -> list[tuple[int, torch.Tensor]]:
        return [(j, x.main + self.heads[j - 1](x.main)) for j in self.trained_depths(x.step)]
