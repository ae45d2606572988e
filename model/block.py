"""Pre-norm transformer block: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(·))."""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.init import scaled_output_init
from model.kv_cache import LayerCache
from model.mlp import SwiGLU
from model.norm import RMSNorm
from model.parallel import ParallelContext


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, num_layers_for_init: int | None = None):
        super().__init__()
        n = num_layers_for_init or cfg.num_layers
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx.params_dtype)
        self.attn = Attention(cfg, ctx, n)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx.params_dtype)
        self.mlp = SwiGLU(cfg, ctx, scaled_output_init(cfg.init_std, n))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))
