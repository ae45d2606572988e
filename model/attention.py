"""Causal grouped-query self-attention, tensor-parallel over heads.

The fused QKV projection is a megatron-core ColumnParallelLinear whose output rows are laid out per
key/value group, `[group0: q.. q, k, v | group1: ...]` (megatron's own layout), so a contiguous
split over TP ranks hands each rank whole groups. The output projection is a RowParallelLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from model.config import ModelConfig
from model.init import normal_init, scaled_output_init
from model.kv_cache import LayerCache
from model.parallel import ParallelContext
from model.recompute import recompute
from model.rotary import RotaryEmbedding
from model.tp_regions import column_parallel, row_parallel


@dataclass
class DocumentMask:
    """Causal attention restricted to each position's own document of a packed window: query i
    sees key j iff j ≤ i and doc_ids[j] == doc_ids[i]. RoPE is relative, so positions need not
    restart per document: a document attends within itself exactly as it would alone."""

    doc_ids: torch.Tensor
    """[B, T] int32, the document of each position (data_pipeline.document_ids)."""
    dense: torch.Tensor | None = None
    """[B, 1, T, T] bool SDPA mask (CPU)."""
    blocks: object | None = None
    """FlexAttention BlockMask (GPUs): only the tiles a document touches are computed."""


def document_mask(doc_ids: torch.Tensor, flex: bool) -> DocumentMask:
    """The mask for doc_ids [B, T], as a FlexAttention block mask (`flex`) or a dense one."""
    b, t = doc_ids.shape
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(batch, head, q, k):
            return (k <= q) & (doc_ids[batch, q] == doc_ids[batch, k])

        blocks = create_block_mask(same_document, b, None, t, t, device=doc_ids.device)
        return DocumentMask(doc_ids, blocks=blocks)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    dense = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
    return DocumentMask(doc_ids, dense=dense[:, None])


def _attend(q, k, v, mask: DocumentMask | None, gqa: bool) -> torch.Tensor:
    """q [B, Hq, T, hd], k, v [B, Hkv, T, hd] → [B, Hq, T, hd], causal (within documents)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask.blocks is not None:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask.blocks, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, num_layers_for_init: int,
                 recompute_core: bool = False):
        """`recompute_core`: keep only the QKV projection's output for the backward and run
        RoPE and attention again there (selective recomputation: saves the rotated q and k, the
        attention output and its softmax statistics)."""
        super().__init__()
        tp = ctx.tp_size
        self.sequence_parallel = ctx.sp_group is not None
        self.regather = ctx.sequence_parallel_regather
        self.recompute_core = recompute_core
        self.head_dim = cfg.head_dim
        self.groups = cfg.kv_heads // tp  # kv heads on this rank
        self.q_per_group = cfg.num_heads // cfg.kv_heads
        mp = ctx.megatron_config()
        qkv_out = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_out, config=mp, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False, tp_group=ctx.tp_group)
        self.proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, config=mp,
            init_method=scaled_output_init(cfg.init_std, num_layers_for_init), bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=ctx.tp_group)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                mask: DocumentMask | None = None) -> torch.Tensor:
        """x [B, T, d] ([B, T/TP, d] under sequence parallelism). Without a cache: causal
        attention over positions 0..T-1 (within documents, with `mask`). With one (generation,
        never sequence-parallel): the tokens sit at `cache.positions` and attend to everything
        cached up to their position."""
        sp = self.sequence_parallel
        if cache is not None:
            assert not sp, "decoding runs without sequence parallelism"
            return self._cached(x, cache)
        qkv = column_parallel(self.qkv, x, sp, self.regather)  # [B, T, groups·(q_per_group+2)·hd]
        if self.recompute_core and torch.is_grad_enabled():
            out = recompute(self._core, qkv, mask)
        else:
            out = self._core(qkv, mask)
        return row_parallel(self.proj, out, sp)

    def _split_heads(self, qkv: torch.Tensor):
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, self.groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(b, t, -1, self.head_dim)  # [B, T, Hq, hd]
        k = qkv[:, :, :, self.q_per_group]  # [B, T, Hkv, hd]
        v = qkv[:, :, :, self.q_per_group + 1]
        return (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]

    def _core(self, qkv: torch.Tensor, mask: DocumentMask | None = None) -> torch.Tensor:
        """The attention core between the projections: [B, T, qkv/TP] → [B, T, Hq·hd/TP]."""
        q, k, v = self._split_heads(qkv)
        q, k = self.rotary(q, k)
        out = _attend(q, k, v, mask, self.q_per_group > 1)  # [B, Hq, T, hd]
        return out.transpose(1, 2).flatten(2)  # [B, T, Hq·hd]

    def _cached(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """The decoding path, in as few kernels as the arithmetic allows (a decoding step is
        launch-bound): one rotation pass over a group's [q.., k, v] (the value slot's table
        entries are cos 1, sin 0), one scatter of keys and values into the cache, and the
        group's query heads folded into the query rows, so grouped-query attention is plain
        attention per key/value head with no repeated keys (`StepInputs.mask` has a row per
        token and query head). The rotation is `forward`'s value for value (same products, same
        sums)."""
        b, t, _ = x.shape
        g, qpg, hd = self.groups, self.q_per_group, self.head_dim
        qkv = column_parallel(self.qkv, x).view(b, t, g, qpg + 2, hd)
        step = cache.step
        rot = qkv * step.cos + qkv.roll(hd // 2, dims=-1) * step.sin  # [B, T, g, qpg+2, hd]
        k_all, v_all = cache.write(rot[:, :, :, qpg:])  # [B, g, S', hd] each
        q = rot[:, :, :, :qpg].permute(0, 2, 1, 3, 4).reshape(b, g, t * qpg, hd)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=step.mask)
        out = out.view(b, g, t, qpg, hd).permute(0, 2, 1, 3, 4).reshape(b, t, g * qpg * hd)
        return row_parallel(self.proj, out)
