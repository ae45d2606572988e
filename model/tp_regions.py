"""Tensor-parallel region mappings and the forward of megatron-core's parallel linear layers.

megatron's scatter/gather along the last dimension allocate on the current CUDA device and
use `all_gather_into_tensor` (absent from gloo); these versions run on any device and backend.

`column_parallel` / `row_parallel` compute what megatron's ColumnParallelLinear/RowParallelLinear
forwards compute in our configuration (no bias, no sequence parallelism, no gradient-accumulation
fusion) with the layers as parameter holders: megatron's own forward calls `warnings.warn` on every
call of a RowParallelLinear (it passes tp_group=None internally), which breaks torch.compile's
graph in the middle of every block, and routes even TP=1 through custom autograd functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


def column_parallel(layer: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] (replicated over TP) → [..., out/TP]; the backward all-reduces dx over TP."""
    assert layer.bias is None and not layer.gather_output and not layer.sequence_parallel
    if layer.tp_group.size() > 1:
        x = copy_to_tensor_model_parallel_region(x, group=layer.tp_group)
    return F.linear(x, layer.weight)


def row_parallel(layer: RowParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in/TP] (this rank's slice) → [..., out], the partial products all-reduced."""
    assert layer.bias is None and layer.input_is_parallel and not layer.sequence_parallel
    y = F.linear(x, layer.weight)
    if layer.tp_group.size() > 1:
        y = reduce_from_tensor_model_parallel_region(y, group=layer.tp_group)
    return y


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., n] on every rank → [..., size·n], the ranks' slices in rank order. One
    all_gather_into_tensor into one buffer where the backend has it (NCCL: a single collective,
    which device-graph capture records as is), a list all_gather on gloo."""
    x = x.contiguous()
    if dist.get_backend(group) == dist.Backend.GLOO:
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)
    out = torch.empty((group.size(), *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out.movedim(0, -2).reshape(*x.shape[:-1], -1)  # [..., size, n] → [..., size·n]



class _ScatterLastDim(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the slices."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(group.size(), dim=-1)[group.rank()].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return gather_last_dim(grad, ctx.group), None


def scatter_to_tp_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., n] (replicated) → [..., n/TP] (this rank's slice); gradients are gathered back."""
    if group.size() == 1:
        return x
    return _ScatterLastDim.apply(x, group)
