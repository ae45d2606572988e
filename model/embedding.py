"""The one shared token embedding and output head.

Both the main model and every MTP depth use this module: its input embedding feeds the trunk (and
the DeepSeek modules' future-token embeddings), its head scores every depth. Under pipeline
parallelism it is the tied layer of the first and the last stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from model.config import ModelConfig
from model.init import normal_init
from model.loss import HeadLoss, fused_head_cross_entropy, unfused_head_cross_entropy
from model.parallel import ParallelContext
from model.tp_regions import gather_last_dim, reduce_scatter_sequence


class SharedEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.tp_group = ctx.tp_group
        self.sp_group = ctx.sp_group
        self.loss_impl = cfg.loss_impl
        self.chunk_rows = cfg.loss_chunk_tokens
        self.loss_kernels = "eager" if cfg.loss_kernels == "auto" else cfg.loss_kernels
        """The build of the fused loss's per-chunk softmax work (model.loss_kernels); 'auto'
        means 'eager' until the caller picks one (model.compile.use_loss_kernels)."""
        v_local = cfg.vocab_size // ctx.tp_size
        self.vocab_start = ctx.tp_rank * v_local
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
            config=ctx.megatron_config(), tp_group=ctx.tp_group)
        if cfg.tie_embeddings:
            self.head_weight = None
        else:
            # Initialised like megatron's layers: the full matrix from the global RNG, then this
            # rank's vocab rows, so every TP size holds slices of the same model.
            full = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=torch.float32)
            normal_init(cfg.init_std)(full)
            rows = full[self.vocab_start : self.vocab_start + v_local]
            self.head_weight = nn.Parameter(rows.to(ctx.params_dtype).clone())
            set_tensor_model_parallel_attributes(self.head_weight, True, 0, 1)

    @property
    def output_weight(self) -> torch.Tensor:
        """[V/TP, d]: this rank's rows of the output head."""
        return self.word_embeddings.weight if self.head_weight is None else self.head_weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        row_weights: torch.Tensor | None = None,
        rows_gathered: bool = False,
    ):
        """Either the embedding lookup, input_ids [B, T] → [B, T, d] (this rank's sequence shard
        [B, T/TP, d] under sequence parallelism), or the head's cross-entropy over rows
        (hidden [N, d], targets [N], row_weights [N]; see model.loss for `rows_gathered`)
        returned as the tensors (total, row_loss, row_correct).

        Both uses go through `forward`, not a separate method, so that whatever wraps module
        calls sees every use of these weights (DeepSpeed ZeRO-3 gathers the partitioned weights
        around forward and, through hooks on the returned tensors, around backward).
        """
        if input_ids is not None:
            return self._embed(input_ids)
        assert hidden is not None and targets is not None and row_weights is not None
        if self.loss_impl == "fused":
            res = fused_head_cross_entropy(
                hidden, self.output_weight, targets, row_weights, self.tp_group,
                self.vocab_start, self.chunk_rows, self.loss_kernels, rows_gathered)
        else:
            res = unfused_head_cross_entropy(
                hidden, self.output_weight, targets, row_weights, self.tp_group, self.vocab_start,
                rows_gathered)
        return res.total, res.row_loss, res.row_correct

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → [B, T, d] (this rank's [B, T/TP, d] under sequence parallelism).
        What megatron's VocabParallelEmbedding computes — the lookup in this rank's vocabulary
        rows, zero for the other ranks' tokens, summed over TP — with the sum reduce-scattered
        over our [B, T, d] layout under sequence parallelism, and without its forward's
        process-group lookups (so that the layer also runs on the meta device)."""
        weight = self.word_embeddings.weight  # [V/TP, d]
        if self.tp_group.size() == 1:
            return F.embedding(input_ids, weight)
        local = input_ids - self.vocab_start
        elsewhere = (local < 0) | (local >= weight.shape[0])
        emb = F.embedding(local.masked_fill(elsewhere, 0), weight)  # [B, T, d]
        emb = emb.masked_fill(elsewhere.unsqueeze(-1), 0.0)
        if self.sp_group is not None:
            return reduce_scatter_sequence(emb, self.sp_group)
        return reduce_from_tensor_model_parallel_region(emb, group=self.tp_group)

    def head_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
        rows_gathered: bool = False,
    ) -> HeadLoss:
        """Cross-entropy of the head over rows: hidden [N, d], targets [N], row_weights [N]."""
        return HeadLoss(*self(hidden=hidden, targets=targets, row_weights=row_weights,
                              rows_gathered=rows_gathered))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding lookup for inference, [B, T] → [B, T, d], with no host synchronisation
        at any TP size, so decoding steps can be captured as device graphs: megatron's lookup
        masks out-of-shard ids by boolean indexing, which waits for the device. Same values;
        no autograd and no ZeRO-3 gathering (inference holds whole weights)."""
        weight = self.word_embeddings.weight
        if self.tp_group.size() == 1:
            return F.embedding(input_ids, weight)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < weight.shape[0])
        out = F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * inside[..., None]
        dist.all_reduce(out, group=self.tp_group)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] (gathered over TP; no autograd) for inference."""
        local = hidden @ self.output_weight.t()  # [..., V/TP]
        if self.tp_group.size() == 1:
            return local
        return gather_last_dim(local, self.tp_group)
