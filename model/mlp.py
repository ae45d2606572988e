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
from model.recompute import recompute
from model.tp_regions import column_parallel, row_parallel


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # [B, T, 2·ffn/TP] = [gate_r | up_r]
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, out_init: InitMethod,
                 recompute_activation: bool = False):
        """`recompute_activation`: keep only the gate/up product for the backward and compute
        silu(gate)·up again there (selective recomputation: saves ffn/TP values a token)."""
        super().__init__()
        self.sequence_parallel = ctx.sp_group is not None
        self.regather = ctx.sequence_parallel_regather
        self.recompute_activation = recompute_activation
        mp = ctx.megatron_config()
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.ffn_size, config=mp, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False, stride=2, tp_group=ctx.tp_group)
        self.down = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, config=mp, init_method=out_init, bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=ctx.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] ([B, T/TP, d] under sequence parallelism) → the same shape."""
        sp = self.sequence_parallel
        gu = column_parallel(self.gate_up, x, sp, self.regather)  # [B, T, 2·ffn/TP]
        if self.recompute_activation and torch.is_grad_enabled():
            act = recompute(_swiglu, gu)
        else:
            act = _swiglu(gu)
        return row_parallel(self.down, act, sp)
