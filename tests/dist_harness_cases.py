"""Light rank functions for the harness's own tests (no heavy imports: fast to spawn)."""

import time

import torch
import torch.distributed as dist


def all_reduce_rank(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 waits on a peer that is gone: the harness must not hang
    return rank


def hang_forever(rank, world):
    if rank == 0:
        time.sleep(3600)
    return rank
