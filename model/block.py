"""Pre-norm transformer block: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(·))."""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention, DocumentMask
from model.config import ModelConfig
from model.init import scaled_output_init
from model.kv_cache import LayerCache
from model.mlp import SwiGLU
from model.norm import make_norm
from model.parallel import ParallelContext
from model.recompute import recompute


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext,
                 num_layers_for_init: int | None = None, recompute: str | None = None):
        """`recompute`: 'none', 'selective' or 'full' for this block (default:
        model.recompute)."""
        super().__init__()
        n = num_layers_for_init or cfg.num_layers
        mode = cfg.recompute if recompute is None else recompute
        self.recompute_whole = mode == "full"
        self.attn_norm = make_norm(cfg.hidden_size, cfg.norm_eps, ctx)
        self.attn = Attention(cfg, ctx, n, recompute_core=mode == "selective")
        self.mlp_norm = make_norm(cfg.hidden_size, cfg.norm_eps, ctx)
        self.mlp = SwiGLU(cfg, ctx, scaled_output_init(cfg.init_std, n),
                          recompute_activation=mode == "selective")
        # The cache-free (training/scoring) forward compiled by `compile_training_forward`; a
        # plain attribute, not a submodule, so state dicts and parameters are unchanged.
        self._compiled_forward = None
        self._compiled_decoding = None  # the cached (decoding) forward, compile_decoding_forward

    def compile_training_forward(self) -> list[nn.Module]:
        """torch.compile the cache-free forward (RMSNorm, RoPE, SwiGLU become fused kernels
        around the matmuls and attention; recomputed regions are partitioned by Inductor).
        Calls with a KV cache (generation) stay eager, so their changing cache state never
        triggers recompilation. Returns the modules the compiled region covers (all of this
        block's)."""
        self._compiled_forward = torch.compile(self._training_forward)
        return list(self.modules())

    def compile_decoding_forward(self) -> list[nn.Module]:
        """torch.compile the cached forward that decoding runs. A separate region from the
        training one, compiled with dynamic shapes: the batch, token and cache-length buckets
        of prefills, steps, rounds and draft windows then share a handful of compilations
        (sizes 1 and larger), below dynamo's recompile limit; captured device graphs replay its
        fused kernels."""
        self._compiled_decoding = torch.compile(self._forward, dynamic=True)
        return list(self.modules())

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                mask: DocumentMask | None = None) -> torch.Tensor:
        """x [B, T, d] ([B, T/TP, d] under sequence parallelism) → the same shape. `mask`:
        attention within documents (training on packed windows)."""
        if cache is not None:
            if self._compiled_decoding is not None:
                return self._compiled_decoding(x, cache)
            return self._forward(x, cache)
        if self._compiled_forward is not None:
            # The rotary tables are built here, outside the compiled region: building them in a
            # recomputed (checkpointed) region is a side effect that dynamo cannot keep in the
            # graph, so the block fell apart into eager pieces (at 8B: −20 % throughput, +4 GiB).
            self.attn.rotary.tables(x.device)
            return self._compiled_forward(x, mask)
        return self._training_forward(x, mask)

    def _training_forward(self, x: torch.Tensor, mask: DocumentMask | None = None):
        if self.recompute_whole and torch.is_grad_enabled():
            return recompute(self._forward, x, None, mask)
        return self._forward(x, None, mask)

    def _forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                 mask: DocumentMask | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, mask)
        return x + self.mlp(self.mlp_norm(x))
