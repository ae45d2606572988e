"""TP=2 and TP=4 (real gloo worlds) equal TP=1 with the same weights: losses, per-depth metrics,
main logits and every gradient, per objective; also the weights' initialisation itself. With
sequence parallelism and with activation recomputation (selective, full, full on some blocks)
the values and every gradient (the norm gains' included) are those of the plain single-process
model."""

from __future__ import annotations

import pytest

from tests import dist_model_cases as cases
from tests.distributed import run_world

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ALL_OBJECTIVES = [
    ("none", 0, {}, {}),
    ("deepseek", 1, {}, {}),
    ("deepseek", 3, {"tie_embeddings": True}, {}),
    ("deepseek", 2, {}, {"detach_trunk": True}),
    ("parallel", 2, {}, {}),
    ("parallel", 3, {"tie_embeddings": True}, {}),
    ("blockwise", 2, {}, {}),
    ("blockwise", 3, {}, {"freeze_trunk": True}),
    ("blockwise", 3, {}, {"sample_one_loss": True}),
    # megatron-core's vocab_parallel_cross_entropy path against our fused loss
    ("deepseek", 2, {"loss_impl": "unfused"}, {}),
    # the Triton loss kernels (interpreted on CPU): split stats + gradient under TP, one fused
    # kernel in the single-process reference
    ("deepseek", 2, {"loss_kernels": "triton"}, {}),
    # sequence parallelism (last field) and recomputation
    ("none", 0, {}, {}, True),
    ("deepseek", 2, {"recompute": "selective"}, {}, True),
    ("deepseek", 1, {"tie_embeddings": True, "recompute": "full"}, {"detach_trunk": True}, True),
    ("parallel", 2, {"recompute": "full", "recompute_num_layers": 1}, {}, True),
    ("blockwise", 2, {"recompute": "selective"}, {"sample_one_loss": True}, True),
    ("parallel", 2, {"recompute": "selective"}, {}),
    ("blockwise", 3, {"recompute": "full"}, {"freeze_trunk": True}),
]


def test_tp2_world2_equals_single_process():
    (worst, _) = run_world(cases.tensor_parallel_equals_single, 2, 2, ALL_OBJECTIVES)
    assert len(worst) == len(ALL_OBJECTIVES)
    assert max(worst.values()) < 1e-5


def _tp4_then_two_tp2_groups(rank, world, tp4, tp2):
    """One world of 4 for both layouts (a second world only repeated four start-ups)."""
    return (cases.tensor_parallel_equals_single(rank, world, 4, tp4),
            cases.tensor_parallel_equals_single(rank, world, 2, tp2))


def test_tp4_and_two_tp2_groups_world4_equal_single_process():
    tp4 = [("deepseek", 2, {"num_kv_heads": 4}, {}), ("parallel", 2, {"num_kv_heads": 4}, {}),
           ("blockwise", 2, {"num_kv_heads": 4}, {}),
           ("none", 0, {"num_kv_heads": 4}, {}, True),
           ("deepseek", 2, {"num_kv_heads": 4, "recompute": "selective"}, {}, True)]
    tp2 = [("deepseek", 1, {}, {}), ("parallel", 1, {}, {}), ("blockwise", 1, {}, {})]
    results = run_world(_tp4_then_two_tp2_groups, 4, tp4, tp2)
    assert all(len(r4) == len(tp4) for r4, _ in results)
    assert all(max(r2.values()) < 1e-5 for _, r2 in results)
