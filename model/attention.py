"""Causal grouped-query self-attention, tensor-parallel over heads.

The fused QKV projection is a megatron-core ColumnParallelLinear whose output rows are laid out per
key/value group, `[group0: q.. q, k, v | group1: ...]` (megatron's own layout), so a contiguous
split over TP ranks hands each rank whole groups. The output projection is a RowParallelLinear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from model.config import ModelConfig
from model.init import normal_init, scaled_output_init
from model.kv_cache import LayerCache
from model.parallel import ParallelContext
from model.rotary import RotaryEmbedding
from model.tp_regions import column_parallel, row_parallel


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, num_layers_for_init: int):
        super().__init__()
        tp = ctx.tp_size
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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, T, d]. Without a cache: causal attention over positions 0..T-1. With one: the
        tokens sit at `cache.positions` and attend to everything cached up to their position."""
        if cache is not None:
            return self._cached(x, cache)
        b, t, _ = x.shape
        qkv = column_parallel(self.qkv, x)  # [B, T, groups·(q_per_group+2)·hd]
        qkv = qkv.view(b, t, self.groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(b, t, -1, self.head_dim)  # [B, T, Hq, hd]
        k = qkv[:, :, :, self.q_per_group]  # [B, T, Hkv, hd]
        v = qkv[:, :, :, self.q_per_group + 1]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        q, k = self.rotary(q, k)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.q_per_group > 1)  # [B, Hq, T, hd]
        out = out.transpose(1, 2).reshape(b, t, -1)  # [B, T, Hq·hd]
        return row_parallel(self.proj, out)

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
