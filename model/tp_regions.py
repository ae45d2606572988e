"""Tensor-parallel region mappings that megatron-core implements with CUDA-only code paths.

megatron's scatter/gather along the last dimension allocate on the current CUDA device and
use `all_gather_into_tensor` (absent from gloo); these versions run on any device and backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _ScatterLastDim(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the slices."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(group.size(), dim=-1)[group.rank()].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


def scatter_to_tp_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., n] (replicated) → [..., n/TP] (this rank's slice); gradients are gathered back."""
    if group.size() == 1:
        return x
    return _ScatterLastDim.apply(x, group)
