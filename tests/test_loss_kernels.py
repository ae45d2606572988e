"""The three builds of the loss's per-chunk softmax work agree, and the fused loss gives the same
losses and gradients with each (Triton runs through its interpreter on CPU tensors)."""

import pytest
import torch

from model.loss import fused_head_cross_entropy
from model.loss_kernels import KERNEL_KINDS, chunk_kernels, triton_available
from model.parallel import single_process_context

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _chunk(n=37, v=300, dtype=torch.float32, seed=0, vocab_start=0, v_global=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    v_global = v_global or v
    targets = torch.randint(0, v_global, (n,), generator=g)
    # Make some targets the row maximum, so the top-1 flag is exercised both ways.
    rows = torch.arange(0, n, 3)
    local = targets[rows] - vocab_start
    keep = (local >= 0) & (local < v)
    logits[rows[keep], local[keep]] = logits[rows[keep]].amax(dim=1) + 1
    weights = torch.rand(n, generator=g)
    return logits, targets, weights


@pytest.mark.parametrize("kind", ["inductor", "triton"])
@pytest.mark.parametrize("vocab_start,v_global", [(0, 300), (300, 900)])  # one TP slice of three
def test_stats_and_grad_match_eager(kind, vocab_start, v_global):
    logits, targets, weights = _chunk(vocab_start=vocab_start, v_global=v_global)
    ref, kern = chunk_kernels("eager"), chunk_kernels(kind)
    want = ref.stats(logits, targets, vocab_start)
    got = kern.stats(logits.clone(), targets, vocab_start)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # Targets on other ranks' slices contribute a zero target logit.
    off_rank = (targets < vocab_start) | (targets >= vocab_start + logits.shape[1])
    assert off_rank.any() == (v_global > logits.shape[1])
    assert (want[2][off_rank] == 0).all()

    log_norm = want[0] + want[1].log()
    g_ref = ref.grad(logits, log_norm, targets, vocab_start, weights)
    g = kern.grad(logits.clone(), log_norm, targets, vocab_start, weights)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    # Over the full vocabulary (no TP) each row's gradient sums to w·(Σ softmax − 1) = 0.
    if v_global == logits.shape[1]:
        torch.testing.assert_close(g.sum(dim=1), torch.zeros(len(g)), atol=1e-5, rtol=0)


def test_fused_triton_kernel_matches_eager_composition():
    """Without TP the Triton build does stats, loss and gradient in one kernel; the eager build
    composes its two functions (as the fused loss does)."""
    logits, targets, weights = _chunk(n=50, v=257)  # V not a multiple of any block size
    ref = chunk_kernels("eager")
    row_max, sum_exp, target_logit = ref.stats(logits, targets, 0)
    log_norm = row_max + sum_exp.log()
    l0, c0 = log_norm - target_logit, target_logit == row_max
    g0 = ref.grad(logits, log_norm, targets, 0, weights)
    l1 = torch.empty(len(targets))
    c1 = torch.empty(len(targets), dtype=torch.bool)
    g1 = chunk_kernels("triton").loss_and_grad(logits.clone(), targets, 0, weights, l1, c1)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert torch.equal(c1, c0) and c0.any() and not c0.all()
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    # The loss is the textbook cross-entropy.
    torch.testing.assert_close(
        l0, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))


def test_triton_grad_overwrites_the_logits_in_place():
    """The Triton build returns the gradient in the logits' own storage (no second chunk-sized
    buffer); the eager build allocates."""
    logits, targets, weights = _chunk(dtype=torch.bfloat16)
    ptr = logits.data_ptr()
    g = chunk_kernels("triton").loss_and_grad(
        logits, targets, 0, weights, torch.empty(len(targets)),
        torch.empty(len(targets), dtype=torch.bool))
    assert g.data_ptr() == ptr and g.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_fused_head_cross_entropy_with_each_build(kind):
    """The whole fused loss (ragged chunks, weights, both gradients) with each build against
    autograd through full logits."""
    g = torch.Generator().manual_seed(1)
    n, d, v = 45, 16, 97
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    row_weights = torch.rand(n, generator=g)
    group = single_process_context().tp_group
    out = fused_head_cross_entropy(hidden, weight, targets, row_weights, group, 0,
                                   chunk_rows=16, kernels=kind)
    (out.total * 2).backward()
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(h2 @ w2.t(), targets, reduction="none")
    ((ce * row_weights).sum() * 2).backward()
    torch.testing.assert_close(out.row_loss, ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_unknown_build_is_refused():
    with pytest.raises(ValueError, match="unknown loss kernels 'fast'"):
        chunk_kernels("fast")


def test_bf16_weight_gradient_is_accumulated_in_fp32():
    """bf16 inputs: the head's weight gradient sums the chunks in fp32 (through addmm with an
    fp32 output where the backend has it, else a cast and add) and matches an fp32 reference
    to bf16 input precision."""
    g = torch.Generator().manual_seed(2)
    n, d, v = 64, 16, 50
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    row_weights = torch.full((n,), 1.0 / n)
    group = single_process_context().tp_group
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        out = fused_head_cross_entropy(h, w, targets, row_weights, group, 0, chunk_rows=8,
                                       kernels="triton")
        out.total.backward()
        assert w.grad.dtype == dtype
        grads[dtype] = w.grad.float()
    torch.testing.assert_close(grads[torch.bfloat16], grads[torch.float32], rtol=2e-2, atol=2e-3)
