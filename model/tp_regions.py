"""Tensor-parallel region mappings and the forward of megatron-core's parallel linear layers,
with and without sequence parallelism.

`column_parallel` / `row_parallel` compute what megatron's ColumnParallelLinear/RowParallelLinear
forwards compute in our configuration (no bias, no gradient-accumulation fusion) with the layers
as parameter holders: megatron's own forward calls `warnings.warn` on every call of a
RowParallelLinear (it passes tp_group=None internally), which breaks torch.compile's graph in the
middle of every block, routes even TP=1 through custom autograd functions, and its
sequence-parallel path takes buffers from a CUDA-only global memory pool.

Sequence parallelism (Korthikanti et al. 2022; docs/DESIGN.md, "Sequence parallelism"): between
the tensor-parallel matmuls, activations [B, T, d] are split along the sequence, rank r holding
positions [r·T/TP, (r+1)·T/TP): norms, residual adds and the MTP tail's elementwise work run on
1/TP of the tokens. A column-parallel layer all-gathers the sequence on its way in (and keeps only
its local input for the backward, re-gathering it there), a row-parallel layer reduce-scatters its
partial sums on the way out. Parameters that are replicated over TP and act on sequence shards
(the norm gains) get partial gradients on each rank; `sum_grad_over_tp` makes their gradients
whole. The collectives are torch.distributed's all_gather_into_tensor / reduce_scatter_tensor,
which NCCL and (since torch 2.x) gloo both implement, so the CPU tests run the GPU code path.

The autograd functions never return a view of a tensor made inside them (`_fresh`): compiled
with torch 2.11, a function whose forward returned such a view got zeros for its incoming
gradient, and the sequence-parallel blocks trained on gradients 99 % wrong while the loss was
right (two H200s; reproduced with torch 2.11 on the CPU, not with 2.13; benchmarks/
check_tp_grads.py, docs/DESIGN.md).
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
from torch import nn


# ------------------------------------------------------------------ collectives along a dim
def _fresh(x: torch.Tensor) -> torch.Tensor:
    """`x` in contiguous memory of its own, never a view of the collective's buffer: the autograd
    functions below return these results (see the module docstring). `contiguous()` would copy
    only along the sequence at B > 1; the extra copies take ~0.3 % of an 8B step's time,
    by estimate."""
    return x.clone(memory_format=torch.contiguous_format)


def all_gather_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    size = group.size()
    moved = x.movedim(dim, 0).contiguous()  # [n, ...]
    out = torch.empty((size * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=group)  # [size·n, ...]
    return _fresh(out.movedim(0, dim))


def reduce_scatter_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum `x` over the ranks and keep this rank's 1/size slice along `dim`."""
    size = group.size()
    moved = x.movedim(dim, 0).contiguous()  # [size·n, ...]
    assert moved.shape[0] % size == 0, (tuple(x.shape), dim, size)
    out = torch.empty((moved.shape[0] // size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, moved, group=group)
    return _fresh(out.movedim(0, dim))


def split_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's 1/size slice of `x` along `dim` (no communication)."""
    return x.chunk(group.size(), dim=dim)[group.rank()].contiguous()


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence shards. Backward: reduce-scatter (the consumers are
    split over TP, so each rank holds a partial gradient of the whole sequence)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: sum the partial results and keep this rank's sequence shard. Backward:
    all-gather the shards' gradients."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.dim, ctx.group), None, None


class _SplitSequence(torch.autograd.Function):
    """Forward: keep this rank's shard of a replicated tensor. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return split_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.dim, ctx.group), None, None


@torch.library.custom_op("mtp::after_gradient", mutates_args=())
def _after_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A copy of `x` that a compiled backward cannot compute before `grad` exists (an opaque op
    that takes it as an input)."""
    return x.clone()


@_after_gradient.register_fake
def _(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _GatherLinear(torch.autograd.Function):
    """y = all_gather(x) @ wᵀ, keeping only the local x for the backward (which gathers it
    again): saving the gathered input would give back what sequence parallelism saves.

    `regather`: make the backward's gather wait for the incoming gradient. Compiled, the
    partitioner otherwise moves that gather (it reads saved values only) into the forward and
    keeps its whole-sequence output — d values a token a layer pair more than the shards."""

    @staticmethod
    def forward(ctx, x, weight, group, regather=False):
        ctx.group, ctx.regather = group, regather
        ctx.save_for_backward(x, weight)
        return F.linear(all_gather_dim(x, 1, group), weight)  # [B, T, out/TP]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:  # not for a frozen trunk
            # Eager, the backward runs in order anyway: no copy needed.
            after = ctx.regather and torch.compiler.is_compiling()
            local = _after_gradient(x, grad) if after else x
            x_full = all_gather_dim(local, 1, ctx.group)  # [B, T, in]
            grad_weight = (grad.reshape(-1, grad.shape[-1]).t()
                           @ x_full.reshape(-1, x.shape[-1])).to(weight.dtype)  # [out/TP, in]
        grad_x = reduce_scatter_dim(grad @ weight, 1, ctx.group)  # [B, T/TP, in]
        return grad_x, grad_weight, None, None


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# ------------------------------------------------------------------ sequence parallelism
SEQUENCE_DIM = 1  # activations are [B, T, d]


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, T/TP, ...] shards → [B, T, ...]; the backward reduce-scatters partial gradients.
    `group` None (no sequence parallelism): `x` as is."""
    if group is None or group.size() == 1:
        return x
    return _GatherSequence.apply(x, SEQUENCE_DIM, group)


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T, ...] partial sums over TP → this rank's summed shard [B, T/TP, ...]."""
    return _ReduceScatterSequence.apply(x, SEQUENCE_DIM, group)


def split_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, T, ...] replicated over TP → this rank's shard [B, T/TP, ...] (`group` None: as is)."""
    if group is None or group.size() == 1:
        return x
    return _SplitSequence.apply(x, SEQUENCE_DIM, group)


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[N, ...] rows of this rank → [TP·N, ...] (rank-major); backward reduce-scatter."""
    if group is None or group.size() == 1:
        return x
    return _GatherSequence.apply(x, 0, group)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Like `gather_rows` for tensors without gradients (targets, masks)."""
    if group is None or group.size() == 1:
        return x
    return all_gather_dim(x, 0, group)


def sum_grad_over_tp(param: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`param` for use on sequence shards: its gradient is summed over the TP group, so that the
    replicated parameter gets the gradient of the whole sequence on every rank."""
    if group is None or group.size() == 1:
        return param
    return _SumGradOverTP.apply(param, group)


def check_sequence_parallel_params(module: nn.Module) -> None:
    """Every parameter must be split over TP or have its gradient summed over TP (see
    `sum_grad_over_tp`): a replicated parameter acting on sequence shards would otherwise train
    on 1/TP of the tokens, differently on every rank."""
    bad = [name for name, p in module.named_parameters()
           if not getattr(p, "tensor_model_parallel", False)
           and not getattr(p, "sequence_parallel_grad", False)]
    if bad:
        raise ValueError(
            f"parallel.sequence_parallel: the parameters {bad[:5]} are neither split over TP nor "
            "have their gradients summed over TP; a module that uses a replicated weight on "
            "sequence shards must pass it through model.tp_regions.sum_grad_over_tp and set "
            "its `sequence_parallel_grad` attribute")


# ------------------------------------------------------------------ parallel linear layers
def column_parallel(layer: ColumnParallelLinear, x: torch.Tensor,
                    sequence_parallel: bool = False, regather: bool = False) -> torch.Tensor:
    """x [B, T, in] replicated over TP (or, with `sequence_parallel`, this rank's [B, T/TP, in])
    → [B, T, out/TP]. The backward all-reduces dx over TP (reduce-scatters it, with SP).
    `regather` (with SP): compiled too, the backward gathers x again rather than the forward
    keeping it gathered (`_GatherLinear`)."""
    assert layer.bias is None and not layer.gather_output and not layer.sequence_parallel
    group = layer.tp_group  # None when built without torch.distributed (meta device): TP 1
    if group is None or group.size() == 1:
        return F.linear(x, layer.weight)
    if sequence_parallel:
        return _GatherLinear.apply(x, layer.weight, group, regather)
    return F.linear(copy_to_tensor_model_parallel_region(x, group=group), layer.weight)


def row_parallel(layer: RowParallelLinear, x: torch.Tensor,
                 sequence_parallel: bool = False) -> torch.Tensor:
    """x [B, T, in/TP] (this rank's slice) → [B, T, out], the partial products all-reduced (with
    `sequence_parallel`: reduce-scattered to this rank's [B, T/TP, out])."""
    assert layer.bias is None and layer.input_is_parallel and not layer.sequence_parallel
    y = F.linear(x, layer.weight)
    group = layer.tp_group
    if group is None or group.size() == 1:
        return y
    if sequence_parallel:
        return reduce_scatter_sequence(y, group)
    return reduce_from_tensor_model_parallel_region(y, group=group)


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
