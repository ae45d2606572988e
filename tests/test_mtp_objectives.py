"""Each objective's loss, per-depth metrics and every gradient equal the naive reference."""

from __future__ import annotations

import random

import pytest
import torch

from model import MTPLanguageModel, single_process_context
from tests.model_fixtures import KINDS, make_batch, randomize_, tiny_config
from tests.reference_model import reference_losses

CTX = None


def ctx():
    global CTX
    if CTX is None:
        CTX = single_process_context()
    return CTX


def build(dcfg, seed=0):
    torch.manual_seed(seed)
    model = MTPLanguageModel(dcfg, ctx())
    randomize_(model)
    return model


def compare_with_reference(dcfg, mtp_weight=0.3, step=0, depths=None, masked=True):
    model = build(dcfg)
    ids, labels, mask = make_batch(dcfg.mtp.depth, masked=masked)
    out = model(ids, labels, mask, mtp_weight=mtp_weight, step=step)
    out.loss.backward()

    ref_params = {n: p.detach().clone().requires_grad_(p.requires_grad)
                  for n, p in model.named_parameters()}
    full_mask = mask if mask is not None else torch.ones(labels.shape)
    total, losses, accs = reference_losses(ref_params, dcfg, ids, labels, full_mask, mtp_weight, depths)
    total.backward()

    torch.testing.assert_close(out.loss, total.detach(), rtol=1e-5, atol=1e-6)
    trained = depths if depths is not None else list(range(dcfg.mtp.depth + 1))
    torch.testing.assert_close(out.depth_loss[trained], torch.stack(losses).detach(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.depth_accuracy[trained], torch.stack(accs), rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        ref = ref_params[n].grad
        if ref is None or not p.requires_grad:
            assert p.grad is None or not p.grad.abs().any(), n
            continue
        assert p.grad is not None, f"{n} received no gradient"
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    return model, out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_objective_matches_naive_reference(kind, depth):
    _, out = compare_with_reference(tiny_config(kind, depth))
    assert out.depth_loss.shape == (depth + 1,)
    assert torch.isfinite(out.depth_loss).all()


def test_next_token_baseline_matches_reference():
    compare_with_reference(tiny_config("none"))


@pytest.mark.parametrize("kind", KINDS)
def test_tied_embeddings_gqa_off_and_no_mask(kind):
    compare_with_reference(tiny_config(kind, 2, tie_embeddings=True, num_kv_heads=None),
                           mtp_weight=0.7, masked=False)


def test_chunk_size_does_not_change_results():
    a = build(tiny_config("deepseek", 2, loss_chunk_tokens=5))
    b = build(tiny_config("deepseek", 2, loss_chunk_tokens=10_000))
    ids, labels, mask = make_batch(2)
    oa, ob = a(ids, labels, mask, 0.3), b(ids, labels, mask, 0.3)
    oa.loss.backward()
    ob.loss.backward()
    torch.testing.assert_close(oa.loss, ob.loss, rtol=1e-6, atol=0)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_blockwise_frozen_trunk_trains_only_the_heads():
    dcfg = tiny_config("blockwise", 3)
    dcfg.mtp.options["freeze_trunk"] = True
    model, out = compare_with_reference(dcfg)
    for n, p in model.named_parameters():
        trainable = n.startswith("tail.objective.")
        assert p.requires_grad == trainable, n
        assert (p.grad is not None and p.grad.abs().sum() > 0) == trainable, n


def test_blockwise_sampled_sub_loss_trains_one_head_per_step():
    dcfg = tiny_config("blockwise", 3)
    dcfg.mtp.options["sample_one_loss"] = True
    step = 11
    chosen = 1 + random.Random(step).randrange(3)
    model, out = compare_with_reference(dcfg, step=step, depths=[0, chosen])
    assert torch.isnan(out.depth_loss[[j for j in (1, 2, 3) if j != chosen]]).all()
    for j in (1, 2, 3):
        got = model.tail.objective.heads[j - 1].down.weight.grad
        assert (got is not None and got.abs().sum() > 0) == (j == chosen)
    # Over steps every head gets its turn.
    assert {tuple(model.tail.objective.trained_depths(s)) for s in range(40)} == {(1,), (2,), (3,)}
