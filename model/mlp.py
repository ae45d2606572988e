"""SwiGLU feed-forward (Shazeer 2020), tensor-parallel over the inner width.

Gate and up projections are one ColumnParallelLinear with stride 2: the full weight is [gate; up],
and each rank holds [gate_r; up_r], so the split into gate and up is local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from model.config import ModelConfig
from model.init import InitMethod, normal_init
from model.parallel import ParallelContext
from model.tp_regions import column_parallel, row_parallel


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, out_init: InitMethod):
        super().__init__()
        mp = ctx.megatron_config()
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.ffn_size, config=mp, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False, stride=2, tp_group=ctx.tp_group)
        self.down = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, config=mp, init_method=out_init, bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=ctx.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = column_parallel(self.gate_up, x)  # [B, T, 2·ffn/TP] = [gate_r | up_r]
        gate, up = gu.chunk(2, dim=-1)
        return row_parallel(self.down, F.silu(gate) * up)
