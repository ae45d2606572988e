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
        # The cache-free (training/scoring) forward compiled by `compile_training_forward`; a
        # plain attribute, not a submodule, so state dicts and parameters are unchanged.
        self._compiled_forward = None
        self._compiled_decoding = None  # the cached (decoding) forward, compile_decoding_forward

    def compile_training_forward(self) -> list[nn.Module]:
        """torch.compile the cache-free forward (RMSNorm, RoPE, SwiGLU become fused kernels
        around the matmuls and attention). Calls with a KV cache (generation) stay eager, so
        their changing cache state never triggers recompilation. Returns the modules the
        compiled region covers (all of this block's)."""
        self._compiled_forward = torch.compile(self._forward)
        return list(self.modules())

    def compile_decoding_forward(self) -> list[nn.Module]:
        """torch.compile the cached forward that decoding runs. A separate region from the
        training one, compiled with dynamic shapes: the batch, token and cache-length buckets
        of prefills, steps, rounds and draft windows then share a handful of compilations
        (sizes 1 and larger), below dynamo's recompile limit; captured device graphs replay its
        fused kernels."""
        self._compiled_decoding = torch.compile(self._forward, dynamic=True)
        return list(self.modules())

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        if cache is None and self._compiled_forward is not None:
            return self._compiled_forward(x)
        if cache is not None and self._compiled_decoding is not None:
            return self._compiled_decoding(x, cache)
        return self._forward(x, cache)

    def _forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))
