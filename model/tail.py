"""The output tail: final norm, shared head and the MTP objective — the last pipeline layer.

All depths' hidden states are stacked into one set of rows and scored by a single fused head +
cross-entropy call, so logits memory stays one chunk whatever D is, and the head weight gradient
is accumulated once.

Total loss:  L = L_main + λ · mean_k L_k  (k over the depths trained this step), where each L_k is
the mean cross-entropy over the target tokens that `loss_mask` keeps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from model.attention import DocumentMask
from model.config import DecoderConfig
from model.embedding import SharedEmbedding
from model.mtp.objective import NO_MTP, MTPObjective, TailInputs, objective_class
from model.norm import make_norm
from model.parallel import ParallelContext
from model.tp_regions import all_gather_rows, gather_rows, split_dim

TAIL_PREFIX = "tail.objective."
"""Name prefix of the MTP objective's parameters in the model's state dict: everything under it
is the MTP tail, everything else the main model."""


class MTPOutput(NamedTuple):
    """What a forward returns. A named tuple, not a dataclass: DeepSpeed finds the loss in the
    output's tuples, lists and dicts to hook the start of the backward (where its BF16 optimizer
    clears the previous micro-batch's gradients before accumulating this one in fp32; missed,
    with a dataclass, it added every earlier micro-batch's gradient again)."""

    loss: torch.Tensor
    """Scalar to backpropagate: L_main + λ · mean_k L_k."""
    depth_loss: torch.Tensor
    """[D+1] detached mean cross-entropy per depth (0 = next token); NaN where a depth was not
    trained this step (blockwise sample_one_loss)."""
    depth_accuracy: torch.Tensor
    """[D+1] teacher-forced top-1 accuracy per depth (NaN where not trained)."""
    depth_tokens: torch.Tensor
    """[D+1] number of target tokens counted per depth (0 where not trained)."""


class OutputTail(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__()
        cfg = dcfg.model
        self.depth = dcfg.mtp.depth
        self.sp_group = ctx.sp_group
        self.final_norm = make_norm(cfg.hidden_size, cfg.norm_eps, ctx)
        kind = dcfg.mtp.kind
        self.objective: MTPObjective | None = (
            objective_class(kind)(dcfg, ctx) if kind != NO_MTP else None)

    def forward(
        self,
        trunk: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor | None,
        shared: SharedEmbedding,
        mtp_weight: float,
        step: int = 0,
        attn_mask: DocumentMask | None = None,
    ) -> MTPOutput:
        """trunk [B, T, d]: the last block's output (before the final norm; [B, T/TP, d], this
        rank's sequence shard, under sequence parallelism);
        labels [B, D+1, T] token ids (row j is the target j+1 tokens ahead);
        loss_mask [B, D+1, T] (1 keeps a target) or None for all targets."""
        sp = self.sp_group
        b, t_local, _ = trunk.shape
        t = t_local * (sp.size() if sp is not None else 1)
        if labels.dim() != 3 or labels.shape[0] != b or labels.shape[2] != t:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}; expected [B={b}, D+1={self.depth + 1}, "
                f"T={t}]")
        if labels.shape[1] != self.depth + 1:
            raise ValueError(
                f"labels carry {labels.shape[1] - 1} extra depths but the model's mtp.depth is "
                f"{self.depth}; build the batches with depth {self.depth}")
        if loss_mask is None:
            loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
        elif loss_mask.shape != labels.shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} differs from labels shape "
                f"{tuple(labels.shape)}")
        mask = loss_mask.float()

        main = self.final_norm(trunk)
        depth_states = [(0, main)]
        if self.objective is not None:
            depth_states += self.objective.depth_hiddens(
                TailInputs(trunk, main, labels, shared, self.final_norm, step, attn_mask))
        depths = [j for j, _ in depth_states]
        n_extra = len(depths) - 1

        if n_extra:
            hidden = torch.stack([h for _, h in depth_states])  # [n, B, T, d]
        else:  # one depth: a view, not a copy
            hidden = main
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [n·B·T, d]
        if sp is not None:  # this rank's positions of the targets: [B, D+1, T/TP]
            labels, mask = split_dim(labels, 2, sp), split_dim(mask, 2, sp)
        targets = _select_depths(labels, depths).transpose(0, 1).reshape(-1)  # [n·B·T]
        row_mask = _select_depths(mask, depths).transpose(0, 1)[None]  # [1, n, B, T]
        if sp is not None:
            # The vocabulary is split over TP, so every rank scores every rank's rows:
            # [n·B·T/TP, d] → [TP·n·B·T/TP, d], rank-major; the backward reduce-scatters.
            hidden = gather_rows(hidden, sp)
            targets = all_gather_rows(targets, sp)
            row_mask = all_gather_rows(row_mask, sp)  # [TP, n, B, T/TP]
        counts = row_mask.sum(dim=(0, 2, 3))  # [n]
        # Each depth's loss is a mean over its own kept targets; extra depths share weight λ.
        scale = torch.full((len(depths),), mtp_weight / max(n_extra, 1), device=mask.device)
        scale[:1].fill_(1.0)  # not `scale[0] = 1.0`: that copies a host scalar and syncs
        row_weights = (row_mask * (scale / counts.clamp(min=1)).view(1, -1, 1, 1)).reshape(-1)

        head = shared.head_loss(hidden, targets, row_weights, rows_gathered=sp is not None)

        with torch.no_grad():
            per_depth_loss = (head.row_loss.view_as(row_mask) * row_mask).sum(dim=(0, 2, 3))
            per_depth_correct = (head.row_correct.view_as(row_mask) * row_mask).sum(
                dim=(0, 2, 3))
            denom = counts.clamp(min=1)
            depth_loss, depth_acc = per_depth_loss / denom, per_depth_correct / denom  # [n]
            if n_extra < self.depth:  # some depths not trained this step: [n] -> [D+1]
                depth_loss, depth_acc, counts = (
                    _scatter_depths(v, depths, self.depth + 1, fill)
                    for v, fill in ((depth_loss, _NAN), (depth_acc, _NAN), (counts, 0.0)))
        return MTPOutput(head.total, depth_loss, depth_acc, counts)


_NAN = float("nan")


def _select_depths(x: torch.Tensor, depths: list[int]) -> torch.Tensor:
    """x [B, D+1, T] -> [B, n, T], the rows of `depths` (increasing). Slices, not a list index:
    indexing a GPU tensor with a host list copies it to the GPU and synchronises the stream."""
    n = len(depths)
    if depths == list(range(n)):
        return x[:, :n]
    return torch.stack([x[:, j] for j in depths], dim=1)


def _scatter_depths(values: torch.Tensor, depths: list[int], size: int,
                    fill: float) -> torch.Tensor:
    """values [n] of the trained `depths` (increasing) placed into a [size] vector of `fill`.
    Built from slices and a cat, not an index tensor: copying a host list to the GPU would
    synchronise the stream in the middle of the step."""
    assert depths == sorted(depths) and len(depths) == values.shape[0]
    parts, prev = [], -1
    for i, j in enumerate(depths):
        if j > prev + 1:
            parts.append(values.new_full((j - prev - 1,), fill))
        parts.append(values[i:i + 1])
        prev = j
    if prev + 1 < size:
        parts.append(values.new_full((size - prev - 1,), fill))
    return torch.cat(parts)
