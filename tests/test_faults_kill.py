"""Fault 1: `kill -9` of the whole job (launcher and every rank, like a node failure) at seeded
random moments — after a random step, at a random time (start-up included), and inside a
checkpoint save. After each kill, `mtp train --resume auto` must start from the newest *complete*
checkpoint, `latest` must never be half-written or name an incomplete checkpoint, and once the
chain of killed lives finally finishes, every step's losses (TensorBoard, last write wins) must
equal the uninterrupted run's bit for bit. One chain runs one process, one a torchrun world of 2
(with its interval saves written in the background).
And `kill -9` of the torchrun launcher alone: its workers must not train on as orphans, and no
two jobs may write one run directory.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from tests.fault_helpers import (
    STEPS,
    Job,
    alive,
    assert_same_curve,
    check_latest,
    complete_steps,
    fault_dataset,
    finished_reference,
    long_run_config,
    partial_dirs,
    record,
    reference_run,
    resumed_step,
    steps_logged,
    train_argv,
)


def test_a_kill_during_pruning_never_leaves_a_gutted_complete_checkpoint(tmp_path, monkeypatch):
    """_prune unmarks an old checkpoint before deleting it: a kill half-way through the rmtree
    leaves an incomplete (ignored) directory, not a 'complete' one missing its weights."""
    import shutil

    from pretrain import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        d = root / ckpt.tag_for(step)
        d.mkdir(parents=True)
        for f in ("state_rank00000.safetensors", "state_rank00000.json"):
            (d / f).write_bytes(b"x")
        (d / ckpt.COMPLETE).write_text("{}")

    def killed_half_way(path, ignore_errors=False):
        next(p for p in sorted(path.iterdir()) if p.name != ckpt.COMPLETE).unlink()
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt._prune(root, keep_last=2)
    assert [r.step for r in ckpt.complete_checkpoints(root)] == [6, 9]


def _saving(run_dir, since: float) -> str | None:
    """The step directory of a save under way: no COMPLETE.json yet, a file written after
    `since` (the launch of this life: a partial directory left by an earlier life does not count)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for d in root.glob("step_*"):
        if (d / "COMPLETE.json").exists():
            continue
        try:
            if any(f.stat().st_mtime > since for f in d.iterdir()):
                return d.name
        except FileNotFoundError:  # pruned under our feet
            continue
    return None


def _kill_chain(tmp_path, data, world: int, plan: list[tuple], seed: int, **sections) -> dict:
    """Run the job, killing it per `plan`, resuming each time; finish it. Returns measurements.
    `sections` change the chain's config (not the reference's: it must not matter)."""
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    cfg = long_run_config(data, run_dir, **sections)
    kills = []
    stale_lock = False
    for i, (kind, arg) in enumerate(plan):
        before = complete_steps(run_dir)
        job = Job(train_argv(cfg, world=world), tmp_path / f"life{i}.log")
        wall_since = time.time()
        if kind == "step":  # a random step after the resume point, then a random few ms
            start = before[-1] if before else 0
            target = min(STEPS - 1, start + arg + rng.randint(0, 3))
            job.wait_for_text(rf"^step {target}/", timeout=180)
            time.sleep(rng.uniform(0.0, 0.03))
        elif kind == "time":  # a random moment after launch (start-up, a step, a save...)
            at = rng.uniform(*arg)
            # (but before the job could finish: a fast machine trains the 40 steps in ~2 s)
            job.wait_until(lambda at=at, job=job: time.monotonic() - job.t0 >= at or
                           max(steps_logged(job.log()), default=0) >= STEPS - 4,
                           timeout=180, poll=0.005, what="the kill time")
        elif kind == "save":  # inside a checkpoint save
            job.wait_until(lambda since=wall_since: _saving(run_dir, since) is not None,
                           timeout=180, poll=0.002, what="a checkpoint save in progress")
        t_kill = time.monotonic() - job.t0
        ranks = job.children()
        job.kill_group(signal.SIGKILL)
        saving = _saving(run_dir, wall_since) if kind == "save" else None
        assert job.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in ranks), "a rank outlived the kill"
        log = job.log()
        if before and "mtp train: world" in log:
            # the life resumed from the newest complete checkpoint it could see
            assert resumed_step(log) == before[-1], log[-3000:]
        if "mtp train: world" in log:  # printed after the run directory's lock was taken
            # a killed life left its lock behind: this one took it over, saying from whom
            assert not stale_lock or re.search(
                r"^mtp train: warning: took over the lock \S+ from pid \d+ on .*: that process "
                r"is gone$", log, re.M), log[-3000:]
            stale_lock = True  # killed holding it
        after = complete_steps(run_dir)
        check_latest(run_dir)
        reached = max(steps_logged(log), default=before[-1] if before else 0)
        kills.append({
            "kind": kind, "killed_at_s": round(t_kill, 2), "reached_step": reached,
            "newest_complete": after[-1] if after else None,
            "steps_lost": reached - (after[-1] if after else 0),
            "partial_dirs": partial_dirs(run_dir), "killed_in_save_of": saving,
            "first_step_s": None if job.first_step_s is None else round(job.first_step_s, 2)})
    final = Job(train_argv(cfg, world=world), tmp_path / "final.log")
    rc = final.wait(timeout=300)
    log = final.log()
    assert rc == 0, log[-4000:]
    assert not stale_lock or "took over the lock" in log, log[-3000:]
    newest = kills[-1]["newest_complete"]
    assert resumed_step(log) == newest, log[-3000:]
    assert steps_logged(log)[0] == (newest or 0) + 1
    assert complete_steps(run_dir)[-1] == STEPS and not partial_dirs(run_dir)
    return {"kills": kills, "final_first_step_s": round(final.first_step_s, 2),
            "run_dir": run_dir}


def _check_and_record(name, out, reference_dir, n_kills):
    kills = out["kills"]
    assert len(kills) == n_kills
    # the "save" kills landed inside a save: its step directory was left unmarked and ignored
    in_save = [k for k in kills if k["kind"] == "save"]
    assert in_save and all(k["killed_in_save_of"] in k["partial_dirs"] for k in in_save), kills
    assert all(int(k["killed_in_save_of"][5:]) > (k["newest_complete"] or 0) for k in in_save)
    assert_same_curve(out["run_dir"], reference_dir, STEPS)
    record(name, kills=kills, final_first_step_s=out["final_first_step_s"],
           max_steps_lost=max(k["steps_lost"] for k in kills))


@pytest.mark.slow
@pytest.mark.distributed
def test_kill9_single_process_at_random_moments_resumes_exactly(tmp_path, tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    reference_run(tmp_path_factory, 1)  # starts in the background
    # Each kind of moment once, the random time twice (start-up included, then later on): every
    # life costs a full start-up, so repeats of a kind only repeat that.
    plan = [("time", (1.0, 6.0)), ("step", 2), ("save", None), ("time", (4.5, 6.5))]
    out = _kill_chain(tmp_path, data, 1, plan, seed=11)
    _check_and_record("kill9_world1", out, finished_reference(tmp_path_factory, 1), len(plan))


@pytest.mark.slow
@pytest.mark.distributed
def test_kill9_torchrun_world2_at_random_moments_resumes_exactly(tmp_path, tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    reference_run(tmp_path_factory, 2)
    plan = [("step", 3), ("save", None), ("time", (5.0, 7.0))]  # each kind of moment once
    # Interval saves in the background, as on GPUs: the "save" kill lands while the ranks'
    # threads write and training goes on.
    out = _kill_chain(tmp_path, data, 2, plan, seed=12, checkpoint={"async_save": True})
    _check_and_record("kill9_torchrun_world2", out, finished_reference(tmp_path_factory, 2),
                      len(plan))


@pytest.mark.slow
@pytest.mark.distributed
def test_kill9_of_the_torchrun_launcher_ends_its_workers_and_one_job_writes_a_run_dir(
        tmp_path, tmp_path_factory):
    """torchrun starts each worker in a session of its own, so a `kill -9` of torchrun alone (the
    OOM killer's choice; a plain node without SLURM's cgroups) used to leave both ranks training
    and checkpointing. Now a second job on the same run directory while the first lives is
    refused on every rank (one line, naming the holder) before it writes anything, and killing
    the first job's launcher ends its workers within seconds. (The next job's takeover of the
    dead job's lock: the kill chains above, every life after the first.)"""
    data = fault_dataset(tmp_path_factory)
    run_dir = tmp_path / "run"
    cfg = long_run_config(data, run_dir, train={"steps": 100000},
                          checkpoint={"interval": 50, "keep_last": 1})
    first = Job(train_argv(cfg, world=2, resume=None), tmp_path / "first.log")
    second = None
    try:
        first.wait_for_text(r"^step 5/", timeout=180)
        ranks = first.children()
        assert len(ranks) == 2, ranks
        # Paused (still alive: a holder is judged by its process, not its pace) so that the
        # second job's start-up does not compete with two busy ranks for the CI's two cores.
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            second = Job(train_argv(cfg, world=2), tmp_path / "second.log")
            assert second.wait(timeout=180) == 1  # torchrun's code for failed workers
        finally:
            for pid in ranks:
                os.kill(pid, signal.SIGCONT)
        refused_s = time.monotonic() - t0
        log = second.log()
        refusals = re.findall(r"^mtp train: error: run directory \S+ is in use by another job: "
                              r"pid (\d+) on .*$", log, re.M)
        assert len(refusals) == 1 and int(refusals[0]) in ranks, log[-3000:]
        # rank 0 exited 2 (torchrun then stops any rank still exiting: its code varies)
        assert re.search(r"exitcode\s*: 2 ", log), log[-3000:]
        assert "mtp train: world" not in log and not steps_logged(log)  # no work, no write
        assert first.proc.poll() is None and all(alive(pid) for pid in ranks)
        paused_at = max(steps_logged(first.log()))
        first.wait_for_text(rf"^step {paused_at + 2}/", timeout=60)  # the first job trains on

        reached = max(steps_logged(first.log()))
        first.proc.kill()  # kill -9 of torchrun alone: its workers are in sessions of their own
        t0 = time.monotonic()
        while any(alive(pid) for pid in ranks) and time.monotonic() - t0 < 20:
            time.sleep(0.01)
        gone_s = time.monotonic() - t0
        assert not any(alive(pid) for pid in ranks), "a worker outlived its launcher"
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        first.kill_group()
        if second is not None:
            second.kill_group()
    assert max(steps_logged(first.log())) <= reached + 50  # nothing trained on after the kill
    record("kill9_launcher", workers_gone_s=round(gone_s, 3), first_step_s=round(
        first.first_step_s, 1), second_job_refused_s=round(refused_s, 1), reached_step=reached)
