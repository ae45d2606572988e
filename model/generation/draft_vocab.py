"""A reduced draft vocabulary: the MTP tail drafts over the K most frequent tokens only.

A draft runs one MTP module and the output head; with a full-vocabulary head the head is most of
a draft's cost (gpt-110m: 24.6M of the 32.9M weights a draft reads), and that cost bounds the
self-speculative speed-up whatever the acceptance (benchmarks/RESULTS.md, "What bounds the
speed-up"). Drafting over K ≪ V tokens cuts the head's share by V/K. Verification is unchanged —
the main model scores the full vocabulary — so greedy output stays identical to plain greedy
and speculative sampling stays distribution-exact: the draft distribution q is zero outside the
K tokens, which rejection sampling handles like any other proposal (a draft of a token outside
the K is never made; the residual max(p − q, 0) covers it). What a smaller K costs is
acceptance: a draft cannot be right where the next token lies outside the K.

The K rows of the head are copied once per engine into one replicated [K, d] matrix: at TP > 1
each rank contributes the rows of its vocabulary shard (one all-reduce at build time), and the
draft head then needs no collective at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.transformer import MTPLanguageModel


class DraftVocabulary:
    """The draft head's K token ids (`ids` [K], long) and their head rows (`weight` [K, d])."""

    def __init__(self, model: MTPLanguageModel, ids: torch.Tensor):
        emb = model.embedding
        local = emb.output_weight  # [V/TP, d]: this rank's vocabulary shard
        group = emb.tp_group
        tp = group.size()
        vocab = local.shape[0] * tp
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("a draft vocabulary needs at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"draft vocabulary ids must lie in [0, {vocab}); got "
                             f"{int(ids.min())}..{int(ids.max())}")
        if ids.unique().numel() != ids.numel():
            raise ValueError("draft vocabulary ids must be distinct")
        self.ids = ids.to(local.device)
        self.vocab_size = vocab
        first = group.rank() * local.shape[0] if tp > 1 else 0
        mine = (self.ids >= first) & (self.ids < first + local.shape[0])  # [K]
        with torch.no_grad():
            rows = local[(self.ids - first).clamp(0, local.shape[0] - 1)]  # [K, d]
            weight = torch.where(mine[:, None], rows, torch.zeros_like(rows))
            if tp > 1:  # every id lies in exactly one shard: the sum assembles the rows
                dist.all_reduce(weight, group=group)
        self.weight = weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] → logits over the K tokens [..., K]."""
        return hidden @ self.weight.t()

    def scatter(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., K] → the same distribution over the full vocabulary [..., V] (zero
        outside the K tokens), as speculative sampling's acceptance test reads it."""
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        full[..., self.ids] = probs
        return full


def ranking(counts: torch.Tensor) -> torch.Tensor:
    """Token ids [V], the most frequent first given occurrences per id [V] (ties: the lower id
    first: a stable sort of -counts)."""
    return torch.sort(-torch.as_tensor(counts, dtype=torch.long), stable=True).indices


def most_frequent(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the `k` most frequent tokens given occurrences per id [V] (ties: the lower id
    first), in ascending id order."""
    if not 1 <= k <= counts.numel():
        raise ValueError(f"draft vocabulary size {k} must lie in [1, {counts.numel()}] (the "
                         f"vocabulary's size)")
    return ranking(counts)[:k].sort().values
