"""Activation recomputation (model.recompute; docs/DESIGN.md, "Memory")."""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint


def recompute(fn, *args):
    """Run `fn(*args)` keeping only its inputs for the backward, which runs it again.

    torch's non-reentrant checkpoint rather than megatron's `tensor_parallel.checkpoint`: it
    composes with torch.compile (Inductor partitions the region itself), with ZeRO-3's parameter
    hooks and with autograd functions that communicate (the TP regions), and it needs no CUDA RNG
    tracker — the model draws no random numbers, so no RNG state is saved or restored either."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
