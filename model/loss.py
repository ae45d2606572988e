"""Output head + cross-entropy over a vocabulary split across tensor-parallel ranks.

`fused_head_cross_entropy` never materialises the logits of all rows: it walks the rows in chunks,
computes each chunk's logits [chunk, V/TP] (in the compute dtype; the softmax math in fp32, by one
of the builds in model/loss_kernels.py), reduces them to losses across TP ranks and, in the same
pass, the gradients w.r.t. the hidden states and the head weight (the softmax minus the
one-hot, times the row weight). Peak logits memory is one chunk, however many MTP depths are
stacked into the rows; compute equals an ordinary head forward + backward (three matmuls). The
gradients are kept for `backward`, which only scales them by the incoming gradient.

`unfused_head_cross_entropy` is the textbook path (full logits + megatron-core's
`vocab_parallel_cross_entropy`), kept as a reference and a memory baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from model.loss_kernels import chunk_kernels


@dataclass
class HeadLoss:
    """Result for N rows of hidden states."""

    total: torch.Tensor
    """Scalar, differentiable: Σ_rows row_weight · CE(row)."""
    row_loss: torch.Tensor
    """[N] fp32 per-row cross-entropy, detached (for per-depth logging)."""
    row_correct: torch.Tensor
    """[N] bool: the target has the highest logit (teacher-forced top-1), detached."""


_FP32_OUT_GEMM: dict[str, bool] = {}
"""Per device type: whether addmm takes low-precision inputs with an fp32 output (CUDA does)."""


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [m, k] fp32 += a [m, n] @ b [n, k]. Where the backend allows, the GEMM adds its fp32
    result into `acc` itself: no rounding of each chunk's product to bf16 and no temporaries
    (otherwise three passes over a [V/TP, d] matrix per chunk)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    kind = acc.device.type
    if _FP32_OUT_GEMM.get(kind, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _FP32_OUT_GEMM[kind] = True
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT_GEMM[kind] = False
    acc += (a @ b).float()


class _FusedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, tp_group, vocab_start, chunk_rows,
                kernels):
        # hidden [N, d] (replicated over TP), weight [V/TP, d] (this rank's vocab rows),
        # targets [N] global token ids, row_weights [N] fp32.
        kern = chunk_kernels(kernels)
        n_rows = hidden.shape[0]
        tp_size = tp_group.size()
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        row_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        row_correct = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)

        for s in range(0, n_rows, chunk_rows):
            e = min(s + chunk_rows, n_rows)
            h = hidden[s:e]
            t = targets[s:e]
            logits = h @ weight.t()  # [n, V/TP] in the compute dtype
            g = None
            if tp_size == 1 and (need_h or need_w) and kern.loss_and_grad is not None:
                g = kern.loss_and_grad(logits, t, vocab_start, row_weights[s:e],
                                       row_loss[s:e], row_correct[s:e])
            else:
                row_max, sum_exp, target_logit = kern.stats(logits, t, vocab_start)
                if tp_size > 1:
                    local_max = row_max.clone()
                    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
                    sums = torch.stack((sum_exp * (local_max - row_max).exp(), target_logit))  # [2, n]
                    dist.all_reduce(sums, group=tp_group)
                    sum_exp, target_logit = sums[0], sums[1]
                log_norm = row_max + sum_exp.log()
                row_loss[s:e] = log_norm - target_logit
                # The target wins when its logit is the (exact, all-reduced) row maximum.
                row_correct[s:e] = target_logit == row_max
                if need_h or need_w:
                    g = kern.grad(logits, log_norm, t, vocab_start, row_weights[s:e])
            if g is not None:
                if need_h:
                    # Partial over this rank's vocab rows; the TP all-reduce is done by the
                    # copy-to-TP-region that feeds `hidden` (its backward).
                    torch.mm(g, weight, out=grad_h[s:e])
                if need_w:
                    _accumulate_fp32(grad_w, g.t(), h)

        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        total = (row_loss * row_weights).sum()
        ctx.mark_non_differentiable(row_loss, row_correct)
        return total, row_loss, row_correct

    @staticmethod
    def backward(ctx, grad_total, _grad_row_loss, _grad_row_correct):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        # In place: a scaled fp32 copy of the [V/TP, d] gradient would be the largest transient
        # of the whole backward (0.98 GiB at the 8B shape's TP 2 vocabulary shard). A second
        # backward through this graph (retain_graph) fails on the saved tensor's version.
        gw = grad_w.mul_(grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def fused_head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    tp_group: dist.ProcessGroup,
    vocab_start: int,
    chunk_rows: int,
    kernels: str = "eager",
    rows_gathered: bool = False,
) -> HeadLoss:
    """hidden [N, d], weight [V/TP, d], targets [N] (global ids), row_weights [N]. `kernels`:
    which build of the per-chunk softmax work runs (model.loss_kernels.KERNEL_KINDS; the same
    values up to rounding). `rows_gathered`: the caller gathered the rows from sequence shards
    (model.tp_regions.gather_rows), whose backward already sums the ranks' partial gradients."""
    if not rows_gathered:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    total, row_loss, row_correct = _FusedHeadCrossEntropy.apply(
        hidden, weight, targets.contiguous(), row_weights.float().contiguous(), tp_group,
        vocab_start, chunk_rows, kernels)
    return HeadLoss(total, row_loss, row_correct)


def unfused_head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    tp_group: dist.ProcessGroup,
    vocab_start: int,
    rows_gathered: bool = False,
) -> HeadLoss:
    """Reference path: full logits for all N rows, megatron-core's vocab-parallel CE.

    megatron's CE reads the TP group from `megatron.core.parallel_state`, which must therefore be
    initialised with the same TP size as `tp_group`.
    """
    if not parallel_state.is_initialized():
        raise RuntimeError(
            "model.loss_impl = 'unfused' uses megatron-core's vocab_parallel_cross_entropy, which "
            "needs megatron.core.parallel_state.initialize_model_parallel(...) first; use "
            "loss_impl 'fused' or initialise parallel_state")
    assert parallel_state.get_tensor_model_parallel_world_size() == tp_group.size()
    if not rows_gathered:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = hidden @ weight.t()  # [N, V/TP]
    row_loss = vocab_parallel_cross_entropy(logits.float(), targets)
    with torch.no_grad():
        lf = logits.float()
        row_max = lf.max(dim=-1).values
        if tp_group.size() > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        local_t = targets - vocab_start
        on_rank = (local_t >= 0) & (local_t < weight.shape[0])
        tl = lf.gather(1, local_t.clamp(0, weight.shape[0] - 1).unsqueeze(1)).squeeze(1)
        is_max = ((tl >= row_max) & on_rank).float()
        if tp_group.size() > 1:
            dist.all_reduce(is_max, group=tp_group)
    total = (row_loss * row_weights.float()).sum()
    return HeadLoss(total, row_loss.detach(), is_max > 0)
