"""Fault 6: a non-finite value in ONE parameter's gradient on ONE rank (an Inf with
train.nonfinite=skip, a NaN with stop), under DP2 with ZeRO-1 and under PP2 (the poisoned
parameter lives on stage 0 only). Every rank must see it the same step: with `skip` every rank
skips that step (weights unchanged, counted) and training goes on; with `stop` every rank stops
with the NonFiniteError (exit 3 from `mtp train`) and no checkpoint is written at or after the
bad step. No checkpoint ever holds a non-finite weight. (A NaN in the loss is covered by
tests/test_training_behaviour.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.checkpoint import complete_checkpoints
from pretrain.export.from_checkpoint import full_state_dict_from_checkpoint
from tests.distributed import run_world
from tests.fault_helpers import fault_dataset, nonfinite_gradient_runs, record

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LAYOUTS = [("dp2-zero1", {"parallel": {"zero_stage": 1}}), ("pp2", {"parallel": {"pp": 2}})]


@pytest.mark.parametrize(("name", "sections"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_nonfinite_gradient_on_one_rank_is_seen_by_all(name, sections, tmp_path,
                                                       tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    ranks = run_world(nonfinite_gradient_runs, 2, str(data), str(tmp_path), name, sections,
                      timeout_s=300)
    skip = [r["skip"] for r in ranks]
    stop = [r["stop"] for r in ranks]

    # skip: the poisoned step (index 2 = step 3) is skipped on every rank, then training goes on
    assert [s["skipped"] for s in skip] == [1, 1], skip
    assert all(s["error"] is None and s["finite"] for s in skip), skip
    losses = skip[0]["losses"]
    assert [step for step, _, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [n for _, _, n in losses] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(loss) for _, loss, _ in losses)  # the loss itself was finite
    assert skip[0]["ckpts"] == [3, 6]

    # stop: every rank stops at step 4 with the error; nothing saved from step 4 on
    for s in stop:
        assert s["error"] and "non-finite loss or gradient at step 4" in s["error"], stop
        assert s["ckpts"] == [2]

    # no checkpoint of either run holds a non-finite weight
    for run in (skip[0]["run_dir"], stop[0]["run_dir"]):
        from pathlib import Path

        for ref in complete_checkpoints(Path(run) / "checkpoints"):
            _, full = full_state_dict_from_checkpoint(ref)
            assert all(torch.isfinite(t).all() for t in full.values()), ref.path
    record(f"nonfinite_gradient_{name}", poisoned=skip[0]["param"], skipped_on_ranks=[1, 1],
           detected_at_step=3, stop_error_step=4, steps_lost_skip=1)
