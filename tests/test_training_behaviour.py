"""Trainer behaviour on CPU: non-finite steps, crashes inside a save, refused resumes, λ."""

from __future__ import annotations

import math
import re

import pytest

from tests import dist_train_cases as cases
from tests.distributed import run_world
from tests.train_fixtures import build_tiny_dataset

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("behaviour")
    data = build_tiny_dataset(root)
    (out,) = run_world(cases.behaviours, 1, str(data), str(root), timeout_s=400)
    return out


def test_nonfinite_skip_leaves_weights_and_goes_on(outcome):
    assert outcome["skip_steps"] == [1, 2, 3, 4, 5, 6]
    # The injected NaN at step index 2 (the third step) is skipped and counted.
    assert outcome["skip_skipped"] == [0, 0, 1, 1, 1, 1]
    assert outcome["skip_final_finite"]
    assert outcome["skip_ckpts"] == [3, 6]
    # ZeRO-1's own inf/NaN check (used with bf16 on GPUs) is the fused one (test_zero_overflow).
    assert outcome["fused_overflow_check"] is True


def test_nonfinite_stop_raises_and_saves_nothing_after(outcome):
    err = outcome["stop_error"]
    assert err is not None and "non-finite loss or gradient at step 4" in err
    assert "train.nonfinite=skip" in err
    assert outcome["stop_ckpts"] == [2]


def test_crash_inside_a_save_leaves_the_previous_checkpoint_as_latest(outcome):
    assert "No space left on device" in outcome["crash_error"]
    assert outcome["crash_complete"] == [3]
    assert outcome["crash_latest"] == "step_00000003"
    assert outcome["crash_partial_exists"]  # the partial directory is there, but ignored
    resumed, clean = outcome["crash_resume"]
    assert resumed == clean and len(resumed) == 3


def test_incompatible_resume_is_refused_with_the_differences(outcome):
    r = outcome["refusals"]
    assert "model.hidden_size: checkpoint 32, now 64" in r["shape"]
    assert "mtp.kind: checkpoint 'deepseek', now 'parallel'" in r["mtp"]
    assert "train.global_batch_size: checkpoint 4, now 8" in r["batch"]


def test_mtp_weight_schedule_follows_tokens_and_is_saved(outcome):
    # boundary at 3 steps × 4 sequences × 16 tokens = 192 tokens: λ 0.5 for steps 1–3, then 0.2
    assert outcome["mtp_weight"] == [0.5, 0.5, 0.5, 0.2, 0.2, 0.2]
    assert outcome["lambda_saved"] == {"values": [0.5, 0.2], "boundaries_tokens": [192]}
    assert outcome["consumed_saved"] == 6 * 4 * 16
    assert not math.isnan(outcome["mtp_weight"][0])


def test_validation_reports_real_draft_acceptance(tmp_path):
    data = build_tiny_dataset(tmp_path)
    val = run_world(cases.acceptance_in_validation, 2, str(data), str(tmp_path), timeout_s=300)[0]
    assert [v["step"] for v in val] == [3, 6]
    for v in val:
        for key in ("val/acceptance/depth_1", "val/acceptance/depth_2"):
            assert 0.0 <= v[key] <= 1.0
        assert 1.0 <= v["val/acceptance/tokens_per_forward"] <= 3.0
        assert "val/loss/depth_2" in v


def test_memory_history_is_written_after_its_window_and_on_out_of_memory(outcome):
    m = outcome["memory"]
    assert "train.memory_snapshot_steps = 2 records the GPU allocator's history" in m["cpu_error"]
    assert "set it to 0" in m["cpu_error"]
    # recording from before the engine is built, written once step 2 is done, then stopped
    assert m["window"] == [("record", True), ("dump", "mem/memory/rank00000.pickle", 2),
                           ("record", False)]
    # step 2 runs out of memory: written then, and the error goes on to stop the run
    assert m["oom_error"] == "injected"
    assert m["oom"] == [("record", True), ("dump", "mem-oom/memory/rank00000.pickle", 1),
                        ("record", False)]
    # through `mtp train`: exit 6 with one paragraph that says where and what fits, and the
    # history written first
    code, err = m["cli"]
    assert code == 6, err
    assert "step 2 ran out of memory: memory history written to " in err
    assert re.search(r"^mtp train: rank 0 of 1: out of device memory in step 2 \(CUDA out of "
                     r"memory\. Tried to allocate 2\.00 GiB\)\. This config does not fit: "
                     r"`mtp plan --config \S+oom\.yaml \[the same overrides\]`.* "
                     r"model\.recompute=full.*--resume auto\.$", err, re.M), err
    assert "Traceback" not in err
