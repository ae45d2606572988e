"""How this process was launched: its rank and world (torchrun, srun, or alone), and tying a
launched worker's life to its launcher's. Free of heavy imports: the CLI reads it before torch.

A worker of torchrun's elastic agent runs in a session of its own (the agent starts every worker
with start_new_session), so when the agent dies abruptly — `kill -9`, the OOM killer — nothing
stops the workers: they train on, orphaned, and keep writing checkpoints into the run directory
that the next job resumes from. `exit_with_launcher` makes the kernel kill the worker when its
parent dies (Linux PR_SET_PDEATHSIG), with a watchdog thread that checks the parent where the
kernel cannot (other systems). docs/DESIGN.md, "One writer per run directory".
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "single", "torchrun" (also the deepspeed launcher) or "slurm"


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on (for a rendezvous of one host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_task(env) -> bool:
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env


def job_rank() -> int:
    """This process's global rank as its launcher announced it (0 when run alone), readable
    before torch.distributed exists: which process of a job reports a mistake all ranks share."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if _srun_task(env):
        return int(env["SLURM_PROCID"])
    return 0


def local_world_size() -> int:
    """How many of the job's processes run on this host, as torchrun (LOCAL_WORLD_SIZE) or srun
    (SLURM_NTASKS_PER_NODE, when the job gave it) announce it; 1 when neither does."""
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or 1)


def detect_launch_env() -> LaunchEnv:
    """Read rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), from SLURM's srun (one task
    per process: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), or run as a world of one. Exports the
    torch.distributed variables so the rest of the stack sees one convention."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launch = LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                           int(env.get("LOCAL_RANK", 0)), "torchrun")
    elif _srun_task(env):
        launch = LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                           int(env.get("SLURM_LOCALID", 0)), "slurm")
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "launched by srun without MASTER_ADDR: export MASTER_ADDR (the first host of "
                "$SLURM_JOB_NODELIST) and MASTER_PORT in the batch script, as "
                "scripts/slurm/train.sbatch does")
    else:
        launch = LaunchEnv(0, 1, 0, "single")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
               LOCAL_RANK=str(launch.local_rank))
    env.setdefault("MASTER_PORT", "29500")
    return launch


def launcher_name() -> str | None:
    """The launcher that started this process as one of its workers, by the variables it sets:
    torchrun's elastic agent (TORCHELASTIC_RUN_ID), the deepspeed launcher (CROSS_RANK) or srun
    (a task of a job step); None for a process started by hand or by a shell, whose life must not
    end with its parent's (`nohup mtp train ... &` outlives the shell on purpose)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "RANK" in env:
        return "deepspeed launcher"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "srun"
    return None


_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, launcher: str, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:  # re-parented: the launcher is gone
            _orphaned(parent, launcher)


def _orphaned(parent: int, launcher: str) -> None:
    rank = os.environ.get("RANK", "?")
    try:
        print(f"mtp: rank {rank}: the {launcher} that started this worker (pid {parent}) is gone; "
              "stopping so that no orphan keeps training", file=sys.stderr, flush=True)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)  # like the parent-death signal: nothing more written


def exit_with_launcher(interval_s: float = 1.0) -> str | None:
    """If a launcher started this process as a worker, make the process die with it: SIGKILL
    from the kernel when the parent exits (Linux), and a daemon thread that checks the parent
    every `interval_s` (everywhere; on Linux it only catches a parent that died before the
    signal was armed). SIGKILL rather than SIGTERM: SIGTERM would checkpoint (exit 75) for a
    requeue that no launcher will do, from a job that someone meant to stop. Returns the
    launcher's name, or None when there is none to follow. Call it first thing in the worker."""
    launcher = launcher_name()
    if launcher is None:
        return None
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was armed
        _orphaned(parent, launcher)
    threading.Thread(target=_watch_parent, args=(parent, launcher, interval_s),
                     name="mtp-launcher-watchdog", daemon=True).start()
    return launcher
