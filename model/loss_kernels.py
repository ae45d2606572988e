"""Per-chunk softmax work of the fused head + cross-entropy, in three interchangeable builds.

For one chunk of logits [n, V/TP] (this rank's vocab slice) and the chunk's global target ids,
the loss needs, per row: the max logit, Σ exp(logit − max) and the target's logit (0 where the
target lies on another rank's slice); after the TP all-reduce of those three, the gradient
w.r.t. the logits is  w · (softmax − onehot).

* `eager`: plain torch ops (CPU, and the reference the others are tested against).
* `inductor`: the same functions under torch.compile, each one fused kernel.
* `triton`: hand-written row kernels (GPU). The stats take one read of the logits (online
  softmax) instead of Inductor's two; the gradient is written over the logits in place, so no
  second [n, V/TP] buffer is allocated; and without TP both run in one kernel whose second pass
  over a row mostly hits L2. Measured against `inductor` in benchmarks/RESULTS.md.

All three return the same values up to fp32 rounding (tests/test_loss_kernels.py, run on the CPU
through Triton's interpreter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have no use for it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

KERNEL_KINDS = ("eager", "inductor", "triton")


# ------------------------------------------------------------------ torch (eager / Inductor)
def _local_targets(targets: torch.Tensor, vocab_start: int, v_local: int):
    """Global ids [n] -> (ids within this rank's slice, clamped to it; whether on this rank)."""
    local_t = targets - vocab_start
    on_rank = (local_t >= 0) & (local_t < v_local)
    return local_t.clamp(0, v_local - 1), on_rank


def _torch_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int):
    """The row max m, Σ exp(l − m) and the target's logit, fp32 [n] each. The sum is relative to
    this rank's own max, so TP ranks combine them online-softmax style after one max
    all-reduce and never need a second pass over the logits."""
    local_t, on_rank = _local_targets(targets, vocab_start, logits.shape[1])
    lf = logits.float()
    row_max = lf.amax(dim=-1)
    sum_exp = (lf - row_max.unsqueeze(1)).exp().sum(dim=-1)
    target_logit = lf.gather(1, local_t.unsqueeze(1)).squeeze(1) * on_rank
    return row_max, sum_exp, target_logit


def _torch_grad(logits: torch.Tensor, log_norm: torch.Tensor, targets: torch.Tensor,
                vocab_start: int, row_weights: torch.Tensor) -> torch.Tensor:
    """d(Σ w·CE)/dlogits = w · (softmax − onehot), [n, V/TP] in the logits' dtype.
    log_norm [n] is the global log Σ exp(logits) (the log-partition)."""
    local_t, on_rank = _local_targets(targets, vocab_start, logits.shape[1])
    probs = (logits.float() - log_norm.unsqueeze(1)).exp()
    cols = torch.arange(logits.shape[1], device=logits.device)
    onehot = (cols.unsqueeze(0) == local_t.unsqueeze(1)) & on_rank.unsqueeze(1)
    return ((probs - onehot.float()) * row_weights.unsqueeze(1)).to(logits.dtype)


# ------------------------------------------------------------------ Triton
if triton is not None:

    @triton.jit
    def _row_kernel(logits_ptr, stride, targets_ptr, vocab_start, V, weights_ptr, log_norm_ptr,
                    max_ptr, sum_ptr, tlogit_ptr, loss_ptr, correct_ptr,
                    STATS: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row. STATS: online max / Σexp over the row (one read) and the
        target's logit; with GRAD as well (no TP), the row's loss and top-1 flag are written and
        the gradient overwrites the row using the row's own log-partition. GRAD alone: the
        gradient from the (all-reduced) log_norm given."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        t = tl.load(targets_ptr + row) - vocab_start
        on_rank = (t >= 0) & (t < V)
        if STATS:
            # Per-lane running max and sum, reduced across lanes once at the end. Start from a
            # finite floor so masked lanes (−inf) never compute exp(−inf − (−inf)).
            m = tl.full([BLOCK], -1e30, tl.float32)
            s = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, x)
                s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
                m = m_new
            row_max = tl.max(m, axis=0)
            sum_exp = tl.sum(s * tl.exp(m - row_max), axis=0)
            t_logit = tl.load(base + t, mask=on_rank, other=0.0).to(tl.float32)
            t_logit = tl.where(on_rank, t_logit, 0.0)
            if GRAD:
                log_norm = row_max + tl.log(sum_exp)
                tl.store(loss_ptr + row, log_norm - t_logit)
                tl.store(correct_ptr + row, (t_logit == row_max).to(tl.int8))
            else:
                tl.store(max_ptr + row, row_max)
                tl.store(sum_ptr + row, sum_exp)
                tl.store(tlogit_ptr + row, t_logit)
        else:
            log_norm = tl.load(log_norm_ptr + row)
        if GRAD:
            w = tl.load(weights_ptr + row)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                onehot = ((cols == t) & on_rank).to(tl.float32)
                g = (tl.exp(x - log_norm) - onehot) * w
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)

    def _launch(logits, targets, vocab_start, weights, log_norm, outs, stats, grad):
        n, v = logits.shape
        assert logits.stride(1) == 1 and targets.is_contiguous()
        dummy = targets  # pointer arguments a mode does not touch
        o = outs + (dummy,) * (5 - len(outs))
        _row_kernel[(n,)](
            logits, logits.stride(0), targets, vocab_start, v,
            weights if weights is not None else dummy,
            log_norm if log_norm is not None else dummy,
            *o, STATS=stats, GRAD=grad, BLOCK=2048, num_warps=8)

    def _triton_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int):
        n = logits.shape[0]
        row_max, sum_exp, t_logit = (
            torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
        _launch(logits, targets, vocab_start, None, None, (row_max, sum_exp, t_logit),
                stats=True, grad=False)
        return row_max, sum_exp, t_logit

    def _triton_grad(logits, log_norm, targets, vocab_start, row_weights):
        _launch(logits, targets, vocab_start, row_weights, log_norm.contiguous(), (),
                stats=False, grad=True)
        return logits

    def _triton_loss_and_grad(logits, targets, vocab_start, row_weights, row_loss, row_correct):
        dummy = row_loss
        _launch(logits, targets, vocab_start, row_weights, None,
                (dummy, dummy, dummy, row_loss, row_correct.view(torch.int8)),
                stats=True, grad=True)
        return logits


@dataclass(frozen=True)
class ChunkKernels:
    """The per-chunk operations one build provides."""

    stats: Callable
    """(logits [n, V/TP], targets [n] global ids, vocab_start) -> (row_max, sum_exp,
    target_logit), fp32 [n] each, relative to this rank's slice."""
    grad: Callable
    """(logits, log_norm [n], targets, vocab_start, row_weights [n]) -> the logits' gradient
    [n, V/TP] in their dtype; may overwrite and return `logits`."""
    loss_and_grad: Callable | None = None
    """Without TP, where a build fuses stats and gradient: (logits, targets, vocab_start,
    row_weights, row_loss out [n], row_correct out [n] bool) -> the gradient, as `grad`; fills
    the two outputs. None: the caller composes `stats` and `grad`."""


def _build(kind: str) -> ChunkKernels:
    if kind == "eager":
        return ChunkKernels(_torch_stats, _torch_grad)
    if kind == "inductor":
        # torch.compile is lazy: nothing compiles until the first call.
        return ChunkKernels(torch.compile(_torch_stats, dynamic=True),
                            torch.compile(_torch_grad, dynamic=True))
    if kind == "triton":
        if triton is None:
            raise RuntimeError("loss kernels 'triton' need the triton package (it ships with "
                               "CUDA builds of torch); use 'inductor' or 'eager'")
        return ChunkKernels(_triton_stats, _triton_grad, _triton_loss_and_grad)
    raise ValueError(f"unknown loss kernels {kind!r}; expected one of {KERNEL_KINDS}")


_BUILT: dict[str, ChunkKernels] = {}


def chunk_kernels(kind: str) -> ChunkKernels:
    """The build `kind` (one of KERNEL_KINDS), created once per process."""
    if kind not in _BUILT:
        _BUILT[kind] = _build(kind)
    return _BUILT[kind]


def triton_available() -> bool:
    return triton is not None
