"""One writer per run directory (pretrain/run_lock.py) and workers that die with their launcher
(pretrain/launch.py), with real processes but no torch: a second job is refused while the holder
lives, a dead holder's lock is taken over with a message, a holder on another machine is judged
by its heartbeat, racing takeovers have exactly one winner, and a launcher's `kill -9` takes its
workers with it (the real torchrun case: tests/test_faults_kill.py)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pretrain.run_lock import LOCK_DIR, RunDirBusy, RunLock, this_process

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the lock and holds it until killed."""
    code = ("import sys, time; from pretrain.run_lock import RunLock; "
            f"RunLock({str(run_dir)!r}, heartbeat_s=0.1).acquire(); print('held', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _write_record(run_dir: Path, generation: int, record: dict, age_s: float = 0.0) -> Path:
    lock = run_dir / LOCK_DIR
    lock.mkdir(parents=True, exist_ok=True)
    path = lock / f"gen-{generation:08d}.json"
    path.write_text(json.dumps(record))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def _other_machine() -> dict:
    return {**this_process(), "host": "node-elsewhere", "boot_id": "another-boot", "pid": 4242}


def test_a_second_job_is_refused_naming_the_holder_then_takes_over_once_it_is_gone(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as refused:
            RunLock(tmp_path).acquire()
        text = str(refused.value)
        assert f"run directory {tmp_path} is in use by another job: pid {holder.pid} on " in text
        assert "the process is running" in text and str(tmp_path / LOCK_DIR) in text
    finally:
        holder.kill()
        holder.wait()
    said = []
    lock = RunLock(tmp_path).acquire(notify=said.append)  # the holder died with the lock held
    assert len(said) == 1 and f"from pid {holder.pid} on " in said[0]
    assert said[0].endswith("that process is gone")
    assert lock.lost() is None
    lock.release()
    said.clear()
    RunLock(tmp_path).acquire(notify=said.append).release()  # released: free, no takeover
    assert said == []
    # generations: holder 1, takeover 2, release 3, acquire 4, release 5 (older ones removed)
    assert [p.name for p in (tmp_path / LOCK_DIR).iterdir()] == ["gen-00000005.json"]


def test_heartbeat_moves_and_a_takeover_is_noticed_by_the_old_holder(tmp_path):
    old = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    t0 = old.path.stat().st_mtime
    deadline = time.monotonic() + 5
    while old.path.stat().st_mtime == t0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert old.path.stat().st_mtime > t0  # refreshed by the heartbeat thread
    # This process again (an earlier trainer that never released): taken over without a word.
    said = []
    new = RunLock(tmp_path).acquire(notify=said.append)
    assert said == [] and new.generation == old.generation + 1
    assert "was taken over by pid" in old.lost()
    old.release()  # not its lock any more: leaves the new holder's alone
    assert new.lost() is None
    new.release()


def test_a_holder_on_another_machine_is_judged_by_its_heartbeat(tmp_path):
    # heartbeat long stopped: taken over at once
    _write_record(tmp_path / "a", 1, _other_machine(), age_s=500)
    said = []
    RunLock(tmp_path / "a", stale_after_s=60).acquire(notify=said.append).release()
    assert "pid 4242 on node-elsewhere" in said[0] and "its heartbeat stopped" in said[0]

    # heartbeat moving: refused as soon as it is seen to move
    path = _write_record(tmp_path / "b", 1, _other_machine())
    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            os.utime(path)

    threading.Thread(target=beat, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RunDirBusy, match=r"on node-elsewhere.*heartbeat is \d+ s old and moving"):
            RunLock(tmp_path / "b", heartbeat_s=0.2, stale_after_s=30).acquire(wait_s=20)
    finally:
        stop.set()
    assert time.monotonic() - t0 < 5

    # heartbeat recent but still: watched until it is older than stale_after_s, then taken over
    _write_record(tmp_path / "c", 1, _other_machine())
    said.clear()
    t0 = time.monotonic()
    RunLock(tmp_path / "c", heartbeat_s=0.2, stale_after_s=1.5).acquire(
        wait_s=20, notify=said.append).release()
    assert 1.0 < time.monotonic() - t0 < 10 and "its heartbeat stopped" in said[0]

    # ... unless the wait allowed is shorter: refused, saying when it would count as gone
    _write_record(tmp_path / "d", 1, _other_machine())
    with pytest.raises(RunDirBusy, match="counts as gone after 60 s without one"):
        RunLock(tmp_path / "d", heartbeat_s=0.2, stale_after_s=60).acquire(wait_s=0.5)


def _race(run_dir: str, start, results, release) -> None:
    start.wait()
    try:
        lock = RunLock(run_dir, heartbeat_s=60).acquire()
    except RunDirBusy:
        results.put("refused")
        return
    results.put("won")
    release.wait()  # stay alive (the winner's process must be seen running) until all judged
    lock.release()


def test_racing_takeovers_of_a_stale_lock_have_exactly_one_winner(tmp_path):
    """Six processes released at once on a dead holder's lock, five rounds: the exclusive
    creation of the next generation admits one, and the others refuse (never two winners)."""
    ctx = mp.get_context("fork")  # no torch in these processes: fork is cheap and safe
    for round_ in range(5):
        run_dir = tmp_path / f"r{round_}"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        _write_record(run_dir, 3, {**this_process(), "pid": int(dead.stdout), "pid_start": 1})
        start, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(run_dir), start, results, release))
                 for _ in range(6)]
        for p in procs:
            p.start()
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        release.set()
        for p in procs:
            p.join(timeout=30)
        assert outcomes == ["refused"] * 5 + ["won"], (round_, outcomes)


_WORKER = textwrap.dedent("""
    import sys, time
    import pretrain.launch as launch
    if sys.argv[1] == "watchdog-only":
        launch._set_parent_death_signal = lambda sig: False  # as on a system without prctl
    print(launch.exit_with_launcher(interval_s=0.1), flush=True)
    time.sleep(120)
""")

_LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    env = dict(os.environ)
    if sys.argv[2] == "torchrun":
        env["TORCHELASTIC_RUN_ID"] = "test"
    # as torchrun's agent starts its workers: each in a session of its own
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[3]], env=env,
                              start_new_session=True, stderr=open(sys.argv[4], "w"))
    print(worker.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("launcher", "mode", "dies"), [
    ("torchrun", "prctl", True),           # the kernel's parent-death signal
    ("torchrun", "watchdog-only", True),   # the watchdog thread, where there is no prctl
    ("shell", "prctl", False),             # started by hand: outlives its parent (nohup)
])
def test_a_worker_dies_with_its_launcher(launcher, mode, dies, tmp_path):
    err = tmp_path / "worker.err"
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _WORKER, launcher, mode, str(err)],
                            stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    worker = int(proc.stdout.readline())
    try:
        armed = proc.stdout.readline().strip()  # the worker's own line, once armed
        assert armed == ("torchrun" if launcher == "torchrun" else "None"), armed
        proc.kill()  # kill -9 of the launcher
        proc.wait()
        deadline = time.monotonic() + (5 if dies else 1)  # dying takes ~0.1 s (watchdog 0.1 s)
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _alive(worker) is not dies
        if mode == "watchdog-only":
            assert "the torchrun that started this worker" in err.read_text()
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
