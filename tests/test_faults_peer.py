"""Fault 2: one rank of a world of 2 dies (kill -9) or hangs (SIGSTOP) mid-run. The surviving
rank must exit on its own with a clear message (exit 5) — at once for a dead peer, after
train.collective_timeout_s for a hung one — never hang; and the job then resumes with
--resume auto to the uninterrupted run's losses.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.fault_helpers import (
    STEPS,
    Job,
    assert_same_curve,
    complete_steps,
    fault_dataset,
    finished_reference,
    launch_ranks,
    long_run_config,
    record,
    reference_run,
    resumed_step,
    steps_logged,
    train_argv,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EXIT_PEER_LOST = 5
HANG_TIMEOUT_S = 10  # what the survivor waits: long enough for start-up skew, short for CI


def test_dead_or_hung_rank_fails_the_survivor_cleanly_then_resumes(tmp_path, tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    reference_run(tmp_path_factory, 2)
    run_dir = tmp_path / "run"
    cfg = long_run_config(data, run_dir)
    measured = {}

    # 1. torchrun world 2: kill -9 rank 1 after step 5. torchrun notices its worker's death and
    #    stops the other; the survivor (rank 0) has already explained itself.
    job = Job(train_argv(cfg, world=2), tmp_path / "life1.log")
    job.wait_for_text(r"^step 5/")
    ranks = job.children()
    assert len(ranks) == 2, ranks
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    rc = job.wait(timeout=60)
    measured["torchrun_kill_exit_s"] = round(time.monotonic() - t0, 2)
    log = job.log()
    assert rc == 1, log[-3000:]  # torchrun's own code for any failed worker
    assert "ChildFailedError" in log and "exitcode: -9" in log, log[-3000:]
    assert re.search(r"mtp train: rank 0 of 2: lost a peer after step \d+: a collective failed "
                     r"\(.*\)\. Another rank died", log), log[-3000:]
    lost_at, after_kill = max(steps_logged(log)), complete_steps(run_dir)[-1]

    # 2. Two ranks started directly (like srun's tasks): rank 1 hangs (SIGSTOP) after step 10;
    #    rank 0 must give up after the collective timeout with exit 5, not hang.
    ranks = launch_ranks(train_argv(cfg, [f"train.collective_timeout_s={HANG_TIMEOUT_S}"]), 2,
                         tmp_path, "life2")
    try:
        ranks[0].wait_for_text(r"^step 10/")
        resumed = resumed_step(ranks[0].log())
        t0 = time.monotonic()
        ranks[1].kill_group(signal.SIGSTOP)
        rc = ranks[0].wait(timeout=HANG_TIMEOUT_S + 60)
        measured["hung_peer_detect_s"] = round(time.monotonic() - t0, 2)
    finally:
        ranks[1].kill_group(signal.SIGKILL)
        ranks[1].wait(timeout=30)
    log = ranks[0].log()
    assert rc == EXIT_PEER_LOST, log[-3000:]
    assert "mtp train: rank 0 of 2: lost a peer after step" in log, log[-3000:]
    assert f"train.collective_timeout_s = {HANG_TIMEOUT_S} s" in log
    assert "Traceback" not in log, log[-3000:]
    assert HANG_TIMEOUT_S - 1 <= measured["hung_peer_detect_s"] <= HANG_TIMEOUT_S + 30
    assert resumed == after_kill
    hung_at = max(steps_logged(log))

    # 3. --resume auto from the newest complete checkpoint, to the end, as if nothing happened.
    newest = complete_steps(run_dir)[-1]
    job = Job(train_argv(cfg, world=2), tmp_path / "life3.log")
    assert job.wait(timeout=300) == 0, job.log()[-3000:]
    assert resumed_step(job.log()) == newest
    assert_same_curve(run_dir, finished_reference(tmp_path_factory, 2), STEPS)
    record("peer_death", **measured, torchrun_kill_steps_lost=lost_at - after_kill,
           hung_steps_lost=hung_at - newest, resumed_from=newest)
