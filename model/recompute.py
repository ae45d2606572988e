"""Activation recomputation (model.recompute; docs/DESIGN.md, "Memory")."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


def _recompute_every_op(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Every op in a recomputed region is recomputed, the collectives included.

    Compiled, a checkpointed region is left to the partitioner, which never recomputes a
    collective that it does not see marked for recomputation, and with torch 2.11 the ops that
    our sequence-parallel autograd functions trace to arrive unmarked: the gathers were saved and,
    with them, every matmul output of the block (an 8B block under full recomputation kept what a
    selective one keeps: +12 GiB at micro-batch 2 on H200s). Saying MUST_RECOMPUTE for each op
    makes the compiled region keep its inputs only, as the eager checkpoint does. Eager, the
    policy would change nothing and cost a dispatch mode on every op, so it is given only to
    compiled regions."""
    return CheckpointPolicy.MUST_RECOMPUTE


def recompute(fn, *args):
    """Run `fn(*args)` keeping only its inputs for the backward, which runs it again.

    torch's non-reentrant checkpoint rather than megatron's `tensor_parallel.checkpoint`: it
    composes with torch.compile (Inductor partitions the region itself), with ZeRO-3's parameter
    hooks and with autograd functions that communicate (the TP regions), and it needs no CUDA RNG
    tracker — the model draws no random numbers, so no RNG state is saved or restored either."""
    if not torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,
                      context_fn=partial(create_selective_checkpoint_contexts,
                                         _recompute_every_op))
