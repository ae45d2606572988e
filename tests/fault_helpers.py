"""Helpers for the fault-injection suite (tests/test_faults_*.py): real `mtp train` jobs in
subprocesses (one process, or torchrun world 2) that can be killed or signalled at a chosen moment,
readers for what they left behind, and a record of the measured recovery numbers.

Every job runs in its own session (process group), so `kill_group` takes down the launcher and
all its ranks at once, like a node failure, and a test never leaves a rank behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from tests.train_fixtures import build_tiny_dataset, loss_scalars

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT by default; SIGUSR1 kills torchrun
# itself (and, by their parent-death signal, the workers, unsaved) unless it is listed here.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
LOSS_TAGS = ("loss/total", "loss/main", "loss/depth_1", "loss/depth_2")

_SESSION: dict = {}


def fault_dataset(tmp_path_factory) -> Path:
    """The tiny dataset, built once per test session for all the fault modules."""
    if "data" not in _SESSION:
        base = tmp_path_factory.getbasetemp()
        _SESSION["record"] = base / "fault-measurements.json"
        _SESSION["data"] = build_tiny_dataset(tmp_path_factory.mktemp("fault-data"))
    return _SESSION["data"]


def record(name: str, **values) -> None:
    """Append measured numbers to BASETEMP/fault-measurements.json (docs/RELIABILITY.md quotes
    them) and print them (visible with pytest -s or in the failure report)."""
    path = _SESSION.get("record") or Path(tempfile.gettempdir()) / "fault-measurements.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"[fault record] {name}: {json.dumps(values, default=str)}")


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/mtp-torch-ext"))
    env.update(extra)
    return env


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_argv(config: Path, overrides=(), world: int = 1, resume: str | None = "auto",
               torchrun_signals: str | None = None) -> list[str]:
    tail = ["-m", "pretrain", "train", "--config", str(config), *overrides]
    if resume:
        tail += ["--resume", resume]
    if world == 1:
        return [PYTHON, *tail]
    extra = ["--signals-to-handle", torchrun_signals] if torchrun_signals else []
    return [TORCHRUN, "--standalone", f"--nproc-per-node={world}", *extra, *tail]


class Job:
    """One launched command (its own session) with its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.argv, self.log_path = argv, log
        self._fh = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env or job_env(), stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.first_step_s: float | None = None  # launch → first training step logged

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        if self.first_step_s is None and re.search(r"^step \d+/", text, re.M):
            self.first_step_s = time.monotonic() - self.t0
        return text

    def wait_until(self, predicate, timeout: float, poll: float = 0.01, what: str = "") -> float:
        """Poll `predicate()` until true; fails if the job exits first or on timeout. Returns the
        seconds since launch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.monotonic() - self.t0
            if self.proc.poll() is not None and not predicate():
                raise AssertionError(f"job exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(poll)
        self.kill_group()
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                             f"{self.log()[-4000:]}")

    def wait_for_text(self, pattern: str, timeout: float = 180) -> float:
        return self.wait_until(lambda: re.search(pattern, self.log(), re.M) is not None,
                               timeout, what=f"/{pattern}/")

    def wait(self, timeout: float = 240) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"job did not exit within {timeout:.0f} s:\n"
                                 f"{self.log()[-4000:]}") from None
        finally:
            self._fh.close()
        self.log()
        return rc

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the launcher's process group and those of its children: torchrun starts each
        worker in a session of its own, so a signal to torchrun's group alone does not reach the
        ranks (a SIGKILL ends them through their parent-death signal; a SIGSTOP would not)."""
        groups = [self.proc.pid]
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                groups.append(os.getpgid(pid))
        for pgid in dict.fromkeys(groups):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def children(self) -> list[int]:
        """Direct children of the launcher (torchrun's ranks), in start order."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped


def steps_logged(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^step (\d+)/", text, re.M)]


def resumed_step(text: str) -> int | None:
    m = re.search(r"^resumed from \S+ at step (\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def complete_steps(run_dir: Path) -> list[int]:
    from pretrain.checkpoint import complete_checkpoints

    return [r.step for r in complete_checkpoints(run_dir / "checkpoints")]


def partial_dirs(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.glob("step_*") if not (p / "COMPLETE.json").is_file())


def check_latest(run_dir: Path) -> None:
    """`latest`, if present, is whole and names a complete checkpoint."""
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        tag = latest.read_text()
        assert re.fullmatch(r"step_\d{8}", tag), f"`latest` holds {tag!r}"
        assert (latest.parent / tag / "COMPLETE.json").is_file(), f"`latest` names {tag}, incomplete"


def assert_same_curve(got_dir: Path, want_dir: Path, steps: int) -> None:
    """Every step's losses in got_dir's TensorBoard equal want_dir's, bit for bit."""
    got, want = loss_scalars(got_dir), loss_scalars(want_dir)
    for tag in LOSS_TAGS:
        assert sorted(want[tag]) == list(range(1, steps + 1)), (tag, sorted(want[tag]))
        assert sorted(got[tag]) == list(range(1, steps + 1)), (tag, sorted(got[tag]))
        diff = [(s, got[tag][s], want[tag][s]) for s in want[tag] if got[tag][s] != want[tag][s]]
        assert not diff, f"{tag}: (step, resumed, uninterrupted) differ: {diff[:10]}"


# ------------------------------------------------------------------ in-process `mtp` calls
def _trigger(spec: dict) -> threading.Thread:
    """Once `spec["when"]` exists, damage `spec["file"]` ("unlink", "truncate" or "garble")."""
    def run():
        when, target = Path(spec["when"]), Path(spec["file"])
        deadline = time.monotonic() + 120
        while not when.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        if spec["do"] == "unlink":
            target.unlink()
        elif spec["do"] == "truncate":
            os.truncate(target, spec.get("size", 3000))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def cli_calls(rank, world, calls):
    """Rank function for tests.distributed.run_world: run `mtp ...` (pretrain.cli.main) for each
    call in turn inside this already-initialised world (imports paid once) and return
    (exit code, stdout, stderr, seconds) per call. A call is {"argv": [...]} plus optionally
    "prepare": [(op, path, ...)] done first and "trigger": {...} (see _trigger) run alongside."""
    from pretrain.cli import main

    out = []
    for call in calls:
        for op, *paths in call.get("prepare", ()):  # file surgery between the calls
            if op == "copytree":
                shutil.copytree(*paths)
            elif op == "copy":
                shutil.copyfile(*paths)
            elif op == "unlink":
                Path(paths[0]).unlink()
            elif op == "truncate":
                os.truncate(paths[0], int(paths[1]))
        thread = _trigger(call["trigger"]) if call.get("trigger") else None
        o, e = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                code = main(call["argv"])
            except SystemExit as exc:  # argparse
                code = exc.code
        if thread is not None:
            thread.join(timeout=1)
        out.append((code, o.getvalue(), e.getvalue(), time.monotonic() - t0))
    return out


# ------------------------------------------------------------------ the shared long-ish run
STEPS = 40  # checkpoint every 3 steps: 13 checkpoints, plenty of moments to kill


def long_run_config(data: Path, run_dir: Path, **sections) -> Path:
    """The config every kill/signal chain and its uninterrupted reference use (only run_dir
    differs), written beside the run directory."""
    from tests.train_fixtures import tiny_run

    merged = {"train": {"steps": STEPS, "collective_timeout_s": 30},
              "checkpoint": {"interval": 3, "keep_last": 3}}
    for key, value in sections.items():
        merged.setdefault(key, {}).update(value)
    cfg = tiny_run(data, run_dir)
    for key, value in merged.items():
        cfg[key].update(value)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return write_config(run_dir.parent / f"{run_dir.name}.yaml", cfg)


def reference_run(tmp_path_factory, world: int) -> tuple[Job, Path]:
    """The uninterrupted run of `long_run_config` on `world` ranks, started once per session in
    the background (it overlaps with the chains that need it); call .wait() before reading it."""
    key = f"ref-w{world}"
    if key not in _SESSION:
        data = fault_dataset(tmp_path_factory)
        base = tmp_path_factory.mktemp(key)
        run_dir = base / "run"
        cfg = long_run_config(data, run_dir)
        _SESSION[key] = (Job(train_argv(cfg, world=world, resume=None), base / "log.txt"), run_dir)
    return _SESSION[key]


def finished_reference(tmp_path_factory, world: int) -> Path:
    job, run_dir = reference_run(tmp_path_factory, world)
    rc = job.wait(timeout=300)
    assert rc == 0, job.log()[-4000:]
    return run_dir


def launch_ranks(argv: list[str], world: int, log_dir: Path, name: str) -> list[Job]:
    """`world` ranks started directly with RANK/WORLD_SIZE/MASTER_* (as srun's tasks are): no
    agent watches them, so a dead peer must be noticed by the survivors themselves."""
    from pretrain.launch import free_port

    port = str(free_port())
    return [Job(argv, log_dir / f"{name}-rank{r}.log",
                env=job_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port))
            for r in range(world)]


def save_error_runs(rank, world, calls, fail_rank: int, fail_step: int):
    """Rank function: `mtp train` calls (as cli_calls) where a call with "inject": True gets one
    OSError(ENOSPC) from the first write of step `fail_step`'s state file (masters and Adam
    moments) on rank `fail_rank` only (the other ranks' writes succeed)."""
    import errno

    from pretrain import checkpoint_state

    real = checkpoint_state.write_safetensors
    armed = {"on": False}

    def failing(f, tensors):
        if (armed["on"] and rank == fail_rank and f"step_{fail_step:08d}" in str(f)
                and "state_rank" in str(f)):
            armed["on"] = False
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(f))
        return real(f, tensors)

    checkpoint_state.write_safetensors = failing
    out = []
    for call in calls:
        armed["on"] = bool(call.get("inject"))
        out.extend(cli_calls(rank, world, [call]))
    return out


def nonfinite_gradient_runs(rank, world, data, tmp, name, sections):
    """Rank function: on `name`'s layout, an Inf (policy skip) or a NaN (policy stop) put into ONE
    element of ONE parameter's gradient, on rank 0 only, at one step. Returns per rank: the
    skipped-step counts, the error (stop), each rank's parameter finiteness, the complete
    checkpoints and rank 0's logged losses."""
    import torch

    from pretrain import checkpoint as ckpt
    from pretrain.config import config_from_dict
    from pretrain.trainer import NonFiniteError, Trainer
    from tests.train_fixtures import tiny_run

    def poison(tr, bad_step, value):
        # the first trainable matrix this rank holds that no other stage shares (under PP not
        # the tied embedding, whose gradients DeepSpeed all-reduces between the stages anyway)
        pname, param = next((n, p) for n, p in tr.engine.module.named_parameters()
                            if p.requires_grad and p.dim() == 2 and "tied" not in n
                            and "embed" not in n)

        def hook(grad):
            if rank == 0 and tr.step == bad_step:
                grad = grad.clone()
                grad.view(-1)[0] = value
            return grad

        param.register_hook(hook)
        return pname

    out = {}
    for policy, bad_step, value, extra in (("skip", 2, float("inf"), {}),
                                            ("stop", 3, float("nan"), {"interval": 2})):
        run_dir = Path(tmp) / f"{name}-{policy}"
        cfg = config_from_dict(tiny_run(
            Path(data), run_dir, **sections, train={"nonfinite": policy},
            checkpoint={"interval": 3, "keep_last": 5, **extra}))
        tr = Trainer(cfg)
        pname = poison(tr, bad_step, value)
        error = None
        try:
            result = tr.train()
            losses = [(m["step"], m["loss/total"], m["optim/skipped_steps"]) for m in result.losses]
        except NonFiniteError as err:
            error, losses = str(err), []
        finite = all(torch.isfinite(p).all().item() for p in tr.engine.module.parameters())
        out[policy] = {"param": pname, "skipped": tr.progress.skipped_steps, "error": error,
                       "finite": finite, "losses": losses,
                       "ckpts": [r.step for r in ckpt.complete_checkpoints(run_dir / "checkpoints")],
                       "run_dir": str(run_dir)}
    return out
