"""Fault 3: preemption. SIGTERM / SIGUSR1 to the launcher (torchrun) or straight to one rank →
every rank checkpoints at the next step boundary and exits 75 (EXIT_PREEMPTED); the resumed
run's losses equal the uninterrupted run's bit for bit.

What torchrun does (torch 2.13, measured here): it forwards SIGTERM (and SIGINT/SIGHUP/SIGQUIT)
to its workers, waits for them (up to its shutdown timeout) and then exits **1** with a
SignalException traceback, whatever the workers returned; SIGUSR1 is forwarded only when listed
in `--signals-to-handle` (otherwise it kills torchrun at once, and with it, through their
parent-death signal, the workers: no checkpoint). When a rank is signalled directly, the ranks stop together and torchrun reports
`failed (exitcode: 75)` for them — again exiting 1. So under torchrun, "checkpointed and
stopped" is the log line plus the complete checkpoint, not the launcher's exit code; a single
process (and each srun task, tests/test_slurm.py) exits 75 itself.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from pretrain.exit_codes import PREEMPTED as EXIT_PREEMPTED
from tests.fault_helpers import (
    STEPS,
    TORCHRUN_SIGNALS,
    Job,
    assert_same_curve,
    complete_steps,
    fault_dataset,
    finished_reference,
    long_run_config,
    record,
    reference_run,
    resumed_step,
    steps_logged,
    train_argv,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _interrupt(job: Job, after_step: int, send) -> tuple[int, int, float, str]:
    """Wait for `after_step`, send the signal; returns (exit code, checkpoint step, seconds from
    signal to exit, log)."""
    job.wait_for_text(rf"^step {after_step}/")
    t0 = time.monotonic()
    send()
    rc = job.wait(timeout=120)
    took = time.monotonic() - t0
    log = job.log()
    m = re.search(r"^signal received: checkpointing at step (\d+) and exiting$", log, re.M)
    assert m, log[-3000:]
    k = int(m.group(1))
    assert k >= after_step and max(steps_logged(log)) == k, log[-3000:]  # no step after it
    assert re.search(rf"^saved checkpoint \S+/step_{k:08d} \(training paused [\d.]+ s\)$", log,
                     re.M), log[-3000:]
    return rc, k, took, log


def test_signals_to_torchrun_and_to_ranks_checkpoint_and_resume_exactly(tmp_path,
                                                                        tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    reference_run(tmp_path_factory, 2)
    run_dir = tmp_path / "run"
    cfg = long_run_config(data, run_dir)
    argv = train_argv(cfg, world=2, torchrun_signals=TORCHRUN_SIGNALS)
    cases = [("SIGTERM to torchrun", 4, lambda j: j.signal(signal.SIGTERM)),
             ("SIGUSR1 to torchrun", 2, lambda j: j.signal(signal.SIGUSR1)),
             ("SIGUSR1 to rank 1", 2, lambda j: __import__("os").kill(j.children()[1],
                                                                      signal.SIGUSR1))]
    measured, last = [], 0
    for i, (what, steps_after, send) in enumerate(cases):
        job = Job(argv, tmp_path / f"life{i}.log")
        rc, k, took, log = _interrupt(job, last + steps_after, lambda job=job, send=send: send(job))
        assert rc == 1, (what, log[-3000:])  # torchrun's code, see the module docstring
        if "rank" in what:
            assert "exitcode: 75" in log, log[-3000:]
        else:
            assert f"got signal: {signal.Signals[what.split()[0]].value}" in log, log[-3000:]
        if last:
            assert resumed_step(log) == last
        assert complete_steps(run_dir)[-1] == k
        measured.append({"signal": what, "checkpoint_step": k, "signal_to_exit_s": round(took, 2),
                         "steps_lost": 0})
        last = k
    job = Job(argv, tmp_path / "final.log")
    assert job.wait(timeout=300) == 0, job.log()[-3000:]
    assert resumed_step(job.log()) == last
    assert_same_curve(run_dir, finished_reference(tmp_path_factory, 2), STEPS)
    record("preemption_torchrun_world2", interruptions=measured)


def test_signals_to_a_single_process_exit_75_and_resume_exactly(tmp_path, tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    reference_run(tmp_path_factory, 1)
    run_dir = tmp_path / "run"
    cfg = long_run_config(data, run_dir)
    measured, last = [], 0
    for i, (sig, steps_after) in enumerate(((signal.SIGTERM, 4), (signal.SIGUSR1, 3))):
        job = Job(train_argv(cfg), tmp_path / f"life{i}.log")
        rc, k, took, log = _interrupt(job, last + steps_after,
                                      lambda job=job, sig=sig: job.signal(sig))
        assert rc == EXIT_PREEMPTED, log[-3000:]
        if last:
            assert resumed_step(log) == last
        measured.append({"signal": sig.name, "checkpoint_step": k,
                         "signal_to_exit_s": round(took, 2), "steps_lost": 0})
        last = k
    job = Job(train_argv(cfg), tmp_path / "final.log")
    assert job.wait(timeout=300) == 0, job.log()[-3000:]
    assert resumed_step(job.log()) == last
    assert_same_curve(run_dir, finished_reference(tmp_path_factory, 1), STEPS)
    record("preemption_single_process", interruptions=measured)
