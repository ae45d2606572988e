"""scripts/slurm/train.sbatch on a real single-node SLURM (scripts/slurm/local_cluster.sh):
a tiny CPU run through sbatch/srun, and the pre-timeout path (SIGUSR1 to the batch script →
checkpoint → `scontrol requeue` → resume) with losses bitwise equal to an uninterrupted run.

The cluster is installed (apt-get, root) and started once for the module and stopped at the end
(unless it was already running). Where SLURM cannot be installed or started the tests skip with
the reason, unless MTP_REQUIRE_SLURM=1 (CI), which turns that into a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.train_fixtures import loss_scalars as _loss_scalars

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
CONFIG = "configs/tiny-cpu.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_len=32",
        "train.micro_batch_size=2", "train.global_batch_size=4", "data.num_workers=0",
        "train.eval_interval=0", "mtp.depth=2", "checkpoint.interval=0"]
# A CPU job on the local node: no GPUs (the header asks for 8), one CPU per task.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]


def _unavailable(reason: str):
    if os.environ.get("MTP_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required (MTP_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"no local SLURM: {reason}")


@pytest.fixture(scope="module")
def slurm_env():
    """Environment (SLURM_CONF and the CPU settings) for sbatch/scontrol and the jobs."""
    state = os.environ.get("MTP_SLURM_DIR", "/tmp/mtp-slurm")
    if shutil.which("bash") is None:
        _unavailable("no bash")
    installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        _unavailable("SLURM is not installed and installing it needs root and apt-get")
    if sys.platform != "linux":
        _unavailable(f"platform {sys.platform}")
    was_running = subprocess.run(["bash", str(CLUSTER), "status", state],
                                 capture_output=True, text=True).returncode == 0
    start = subprocess.run(["bash", str(CLUSTER), "start", state], capture_output=True, text=True,
                           timeout=300)
    m = re.search(r"^export SLURM_CONF=(\S+)$", start.stdout, re.M)
    if start.returncode != 0 or not m:
        _unavailable(f"local_cluster.sh start failed (exit {start.returncode}): "
                     f"{start.stderr.strip()[-2000:]}")
    env = dict(os.environ, SLURM_CONF=m.group(1), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/mtp-torch-ext")
    if sys.prefix != sys.base_prefix:  # the venv running the tests is the one the jobs use
        env["MTP_VENV"] = sys.prefix
    for key in [k for k in env if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                         "MASTER_PORT") or k.startswith("SLURM_") and
                k != "SLURM_CONF"]:
        del env[key]
    yield env
    if not was_running:
        subprocess.run(["bash", str(CLUSTER), "stop", state], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A few stdlib packages, tokenized with a 512-token BPE into 32-token windows (~2 s)."""
    root = tmp_path_factory.mktemp("slurm-data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email"):
        shutil.copytree(stdlib / pkg, root / "src" / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = root / "data"
    subprocess.run([sys.executable, "-m", "pretrain", "prepare", "--source", str(root / "src"),
                    "--include", "**/*.py", "--out", str(out), "--vocab-size", "512",
                    "--seq-len", "32", "--max-depth", "2", "--no-progress"],
                   check=True, capture_output=True, cwd=REPO, timeout=120)
    return out


# ---------------------------------------------------------------------------------- helpers
def _sbatch(env, log_dir: Path, sbatch_opts: list[str], overrides: list[str]) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_dir}/job-%j.log", *sbatch_opts, str(SBATCH),
         CONFIG, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _job(env, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _log(log_dir: Path, job_id: str) -> str:
    path = log_dir / f"job-{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_job(env, job_id: str, log_dir: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(env, job_id)
        if info["JobState"] in TERMINAL:
            return info
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], env=env, capture_output=True)
    pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s (state {info['JobState']}); "
                f"log:\n{_log(log_dir, job_id)[-4000:]}")


def _wait_for_text(env, job_id: str, log_dir: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, _log(log_dir, job_id), re.M):
            return
        if _job(env, job_id)["JobState"] in TERMINAL:
            break
        time.sleep(0.1)
    subprocess.run(["scancel", job_id], env=env, capture_output=True)
    pytest.fail(f"job {job_id}: no /{pattern}/ in its log; log:\n{_log(log_dir, job_id)[-4000:]}")


# ---------------------------------------------------------------------------------- tests
@pytest.mark.timeout(300)
def test_sbatch_tiny_cpu_run_two_tasks_then_resume_on_one(slurm_env, tiny_data, tmp_path):
    """Two srun tasks (DP = 2) rendezvous through MASTER_ADDR/PORT from the batch script; the
    same run directory then resumes in a job of one task (a node lost): resharded on load."""
    run_dir = tmp_path / "run"
    job = _sbatch(slurm_env, tmp_path, [*CPU_JOB, "--ntasks-per-node=2"],
                  [*TINY, f"data.path={tiny_data}", f"run_dir={run_dir}", "train.steps=20",
                   "train.log_interval=5"])
    info = _wait_job(slurm_env, job, tmp_path, timeout=150)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "0"
    assert "2 task(s)/node, world 2" in log and "rendezvous " in log
    assert "mtp train: world 2 = TP 1 × PP 1 × DP 2" in log  # srun ranks, not two worlds of 1
    assert re.search(r"^step 20/20 \| loss \d+\.\d+ \| mtp \S+ \S+ \| acc ", log, re.M), log
    assert "training step exited with code 0" in log and "training finished" in log
    assert (run_dir / "checkpoints" / "step_00000020" / "COMPLETE.json").is_file()
    losses = _loss_scalars(run_dir)
    assert sorted(losses["loss/total"]) == [5, 10, 15, 20]

    job = _sbatch(slurm_env, tmp_path, [*CPU_JOB, "--ntasks-per-node=1"],
                  [*TINY, f"data.path={tiny_data}", f"run_dir={run_dir}", "train.steps=25",
                   "train.log_interval=5"])
    info = _wait_job(slurm_env, job, tmp_path, timeout=150)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "mtp train: world 1 = TP 1 × PP 1 × DP 1" in log
    assert re.search(r"^resharding \S+step_00000020: written at TP 1 × PP 1 × DP 2, ZeRO \d, "
                     r"resuming at TP 1 × PP 1 × DP 1", log, re.M), log[-4000:]
    assert re.search(r"^step 25/25 \| loss ", log, re.M), log[-4000:]
    [event] = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert event["resharded"] and event["step"] == 20
    assert (event["from_layout"]["dp"], event["to_layout"]["dp"]) == (2, 1)


@pytest.mark.timeout(300)
def test_pre_timeout_signal_checkpoints_requeues_and_resumes_exactly(slurm_env, tiny_data,
                                                                     tmp_path):
    steps = 200
    overrides = [*TINY, f"data.path={tiny_data}", f"train.steps={steps}", "train.log_interval=1"]
    # The uninterrupted reference, run directly (not through SLURM) while the job runs.
    ref_dir = tmp_path / "reference"
    ref = subprocess.Popen(
        [sys.executable, "-m", "pretrain", "train", "--config", CONFIG, *overrides,
         f"run_dir={ref_dir}"], cwd=REPO, env=slurm_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = tmp_path / "run"
        job = _sbatch(slurm_env, tmp_path, [*CPU_JOB, "--ntasks-per-node=1"],
                      [*overrides, f"run_dir={run_dir}"])
        _wait_for_text(slurm_env, job, tmp_path, r"^step 5/", timeout=120)
        # What `#SBATCH --signal=B:USR1@120` does shortly before the time limit.
        sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env,
                             capture_output=True, text=True, timeout=30)
        assert sig.returncode == 0, sig.stderr
        info = _wait_job(slurm_env, job, tmp_path, timeout=180)
        ref_out, _ = ref.communicate(timeout=180)
    finally:
        if ref.poll() is None:
            ref.kill()
    log = _log(tmp_path, job)
    assert ref.returncode == 0, ref_out[-4000:]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]

    # signal → checkpoint at a step boundary before the end → requeue → resume from it
    assert "received SIGUSR1: forwarding SIGUSR1 to the training step" in log, log
    stop = re.search(r"signal received: checkpointing at step (\d+) and exiting", log)
    assert stop, log
    k = int(stop.group(1))
    assert 5 <= k < steps
    assert f"saved checkpoint {run_dir}/checkpoints/step_{k:08d}" in log
    assert "training step exited with code 75" in log
    assert f"requeueing job {job}" in log and f"requeued job {job}" in log
    assert "run 2 (SLURM_RESTART_COUNT=1)" in log
    assert f"resumed from {run_dir}/checkpoints/step_{k:08d} at step {k}" in log
    assert log.rstrip().endswith("training finished"), log[-2000:]
    assert (run_dir / "checkpoints" / f"step_{k:08d}" / "COMPLETE.json").is_file()
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE.json").is_file()

    # the resumed run's losses equal the uninterrupted run's, bit for bit
    got, want = _loss_scalars(run_dir), _loss_scalars(ref_dir)
    tags = ["loss/total", "loss/main", "loss/depth_1", "loss/depth_2"]
    assert set(tags) <= set(want), sorted(want)
    assert set(want) == set(got)
    for tag in want:
        assert sorted(want[tag]) == list(range(1, steps + 1)), tag
        assert sorted(got[tag]) == list(range(1, steps + 1)), tag
        diff = [(s, got[tag][s], want[tag][s]) for s in want[tag] if got[tag][s] != want[tag][s]]
        assert not diff, f"{tag}: (step, resumed, reference) differ: {diff[:10]}"


@pytest.mark.timeout(240)
def test_signal_during_startup_is_not_lost(slurm_env, tiny_data, tmp_path):
    """SIGUSR1 while the trainer still imports/builds/resumes (before its first step) must not
    kill it: the job should still stop with exit 75, be requeued and finish. (A job that starts
    less than --signal's lead time before its limit, or a `scancel --signal=USR1` at start-up.)"""
    run_dir = tmp_path / "run"
    job = _sbatch(slurm_env, tmp_path, [*CPU_JOB, "--ntasks-per-node=1"],
                  [*TINY, f"data.path={tiny_data}", f"run_dir={run_dir}", "train.steps=20",
                   "train.log_interval=5"])
    _wait_for_text(slurm_env, job, tmp_path, r"launching: srun", timeout=60)
    time.sleep(1.5)  # srun has started the trainer; it is importing torch/DeepSpeed (~5 s)
    log = _log(tmp_path, job)
    assert "mtp train: world" not in log, "the trainer finished its setup too early for this test"
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env,
                         capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    info = _wait_job(slurm_env, job, tmp_path, timeout=180)
    log = _log(tmp_path, job)
    assert "received SIGUSR1: forwarding SIGUSR1 to the training step" in log, log
    assert "training step exited with code 75" in log, log[-4000:]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert log.rstrip().endswith("training finished"), log[-2000:]
