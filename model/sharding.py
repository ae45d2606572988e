"""Conversion between this rank's tensor-parallel shards and full (TP=1) tensors.

A parameter split by megatron-core carries `tensor_model_parallel`, `partition_dim` and
`partition_stride`: the full tensor is `stride` blocks along `dim`, each block split evenly over
the TP ranks, and rank r holds [block_0 part r, block_1 part r, …] (e.g. the SwiGLU [gate; up]
weight has stride 2). Everything else is replicated over TP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def tp_layout(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, stride) of a TP-split parameter, or None if it is replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of a full tensor."""
    if full.shape[dim] % (size * stride):
        raise ValueError(
            f"cannot split a dimension of {full.shape[dim]} into {size} ranks × {stride} blocks")
    parts = full.chunk(size * stride, dim=dim)  # block-major: parts[s·size + r]
    return torch.cat(parts[rank::size], dim=dim).contiguous()


def concat_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (inverse of `shard_tensor`)."""
    per_rank = [s.chunk(stride, dim=dim) for s in shards]  # [rank][block]
    return torch.cat([per_rank[r][b] for b in range(stride) for r in range(len(shards))], dim=dim)


def gather_tensor(local: torch.Tensor, dim: int, stride: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The full tensor from every rank's shard (a collective over `group`)."""
    size = group.size()
    if size == 1:
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return concat_shards(shards, dim, stride)


def full_state_dict(model: nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Gathered (TP=1) copy of the model's parameters (collective over the TP group)."""
    out = {}
    for name, p in model.named_parameters():
        layout = tp_layout(p)
        out[name] = p.detach().clone() if layout is None else gather_tensor(p.detach(), *layout, group)
    return out


def full_grads(model: nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor | None]:
    """Gathered (TP=1) gradients; None where a parameter received none (collective)."""
    out: dict[str, torch.Tensor | None] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            out[name] = None
            continue
        layout = tp_layout(p)
        out[name] = p.grad.clone() if layout is None else gather_tensor(p.grad, *layout, group)
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], group: dist.ProcessGroup,
                         prefix_excluded: str | None = None) -> None:
    """Copy full (TP=1) tensors into this rank's shards. Every parameter must be present, except
    those under `prefix_excluded` (neither copied nor expected, e.g. model.tail.TAIL_PREFIX)."""
    params = dict(model.named_parameters())
    if prefix_excluded is not None:
        params = {k: v for k, v in params.items() if not k.startswith(prefix_excluded)}
        full = {k: v for k, v in full.items() if not k.startswith(prefix_excluded)}
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        layout = tp_layout(p)
        src = full[name] if layout is None else shard_tensor(full[name], *layout, group.rank(), group.size())
        if src.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(src.shape)} does not fit {tuple(p.shape)}")
        p.copy_(src)
