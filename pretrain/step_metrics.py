"""Per-step loss metrics: averaged over micro-batches and data-parallel ranks, delivered to rank 0
with a single all-reduce (the values live on the last pipeline stage)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import MTPOutput, accelerator
from pretrain.distributed import Topology


@dataclass
class StepStats:
    outputs: list[MTPOutput]
    """One per micro-batch; empty on ranks that do not run the tail."""
    lr: float
    mtp_weight: float
    applied: bool
    """False when the optimizer skipped the step (non-finite gradients)."""


def gather_to_rank0(stats: StepStats, topo: Topology, depth: int, prefix: str = "") -> dict[str, float]:
    """Collective over the world. Returns the metrics on every rank (meaningful on rank 0)."""
    n = depth + 1
    # [loss sums (n), accuracy sums (n), micro-batch counts (n), total-loss sum, micro-batches]
    vec = torch.zeros(3 * n + 2, dtype=torch.float64)
    if topo.is_last_stage and topo.tp_rank == 0:
        for out in stats.outputs:
            trained = out.depth_tokens.cpu() > 0
            # Untrained depths (NaN by convention) add nothing; a real non-finite loss shows.
            vec[:n] += torch.where(trained, out.depth_loss.double().cpu(), 0.0)
            vec[n:2 * n] += torch.where(trained, out.depth_accuracy.double().cpu(), 0.0)
            vec[2 * n:3 * n] += trained.double()
            vec[3 * n] += out.loss.detach().double().cpu()
            vec[3 * n + 1] += 1
    vec = vec.to(accelerator.current_device())  # NCCL reduces device tensors only
    dist.all_reduce(vec)
    vec = vec.cpu()
    counts = vec[2 * n:3 * n].clamp(min=1)
    loss, acc = vec[:n] / counts, vec[n:2 * n] / counts
    out = {f"{prefix}loss/total": (vec[3 * n] / vec[3 * n + 1].clamp(min=1)).item(),
           f"{prefix}loss/main": loss[0].item()}
    for k in range(n):
        if vec[2 * n + k] == 0:
            continue
        out[f"{prefix}loss/depth_{k}"] = loss[k].item()
        out[f"{prefix}accuracy/depth_{k}"] = acc[k].item()
    return out
