"""The fused inf/NaN check answers what DeepSpeed's per-tensor ZeRO-1/2 check answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from pretrain.zero_overflow import _has_overflow_fused, use_fused_overflow_check


def _fake_optimizer(groups):
    return SimpleNamespace(bit16_groups=groups, averaged_gradients=dict(enumerate(groups)),
                           device="cpu", _has_inf_or_nan=DeepSpeedZeroOptimizer._has_inf_or_nan)


def _grads(bad=None):
    g = torch.Generator().manual_seed(0)
    groups = [[torch.randn(7, 5, generator=g), None, torch.randn(3, generator=g)],
              [torch.randn(11, generator=g) * 1e30, torch.empty(0)]]  # big: L2 would overflow
    if bad is not None:
        group, idx, pos, value = bad
        groups[group][idx].view(-1)[pos] = value
    return groups


@pytest.mark.parametrize("bad", [None, (0, 0, 3, float("nan")), (0, 2, 1, float("inf")),
                                 (1, 0, 10, float("-inf")), (1, 0, 0, float("nan"))])
def test_fused_check_matches_deepspeed(bad):
    opt = _fake_optimizer(_grads(bad))
    reference = DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt)
    fused = _has_overflow_fused(opt)
    assert fused.shape == (1,) and fused.dtype == torch.bool
    assert bool(fused) == bool(reference) == (bad is not None)


def test_no_gradients_is_no_overflow():
    assert not bool(_has_overflow_fused(_fake_optimizer([[None], []])))


def test_only_zero_1_2_optimizers_are_patched():
    assert use_fused_overflow_check(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])) is False
