"""Fault 4: a checkpoint save that cannot be written — an injected ENOSPC on one rank of a DP2
world, and a real full filesystem (a small tmpfs). The previous complete checkpoint stays the one
`latest` names and `--resume auto` picks; the error is reported; `checkpoint.on_save_error`
decides: 'stop' (default) ends the run on every rank with exit 4, 'continue' logs the error,
removes the partial directory and trains on (exit 4 at the end if the final save failed too).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import pytest

from tests.distributed import run_world
from tests.fault_helpers import (
    check_latest,
    cli_calls,
    complete_steps,
    fault_dataset,
    partial_dirs,
    record,
    save_error_runs,
    steps_logged,
    write_config,
)
from tests.train_fixtures import loss_scalars, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EXIT_SAVE_FAILED = 4
NINE = {"train": {"steps": 9}, "checkpoint": {"interval": 3, "keep_last": 5}}


def _config(data, run_dir, **extra):
    cfg = tiny_run(data, run_dir)
    for section, values in {**NINE, **extra}.items():
        cfg[section] = {**cfg[section], **values}
    return write_config(run_dir.parent / f"{run_dir.name}.yaml", cfg)


def test_injected_write_error_on_one_rank_stop_or_continue(tmp_path, tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    runs = {name: tmp_path / name for name in ("clean", "stop", "cont")}
    cfgs = {name: _config(data, d) for name, d in runs.items()}
    calls = [
        {"argv": ["train", "--config", str(cfgs["clean"])]},
        {"argv": ["train", "--config", str(cfgs["stop"])], "inject": True},
        {"argv": ["train", "--config", str(cfgs["stop"]), "--resume", "auto"]},
        {"argv": ["train", "--config", str(cfgs["cont"]), "checkpoint.on_save_error=continue"],
         "inject": True},
    ]
    ranks = run_world(save_error_runs, 2, calls, 1, 6, timeout_s=300)
    (clean0, stop0, resume0, cont0), (_, stop1, _, cont1) = ranks
    assert clean0[0] == 0, clean0[2][-3000:]

    # stop: both ranks exit 4 (no hang: the failing rank still walks DeepSpeed's collectives),
    # rank 1 names the file, and step 3 stays the newest complete checkpoint and `latest`.
    assert stop0[0] == stop1[0] == EXIT_SAVE_FAILED, (stop0[2][-2000:], stop1[2][-2000:])
    assert re.search(r"checkpoint save failed: could not write checkpoint step 6 \(\S+"
                     r"step_00000006: OSError: .*No space left on device \(injected\): "
                     r"'\S+state_rank00001\.safetensors'.*newest complete checkpoint is step 3",
                     stop1[2]), stop1[2]
    assert "newest complete checkpoint is step 3" in stop0[2]
    assert max(steps_logged(stop0[1])) == 6
    # resume picks step 3 (the partial step-6 directory is ignored) and trains to the end
    assert resume0[0] == 0, resume0[2][-3000:]
    assert re.search(r"^resumed from \S+step_00000003 at step 3$", resume0[1], re.M)
    assert complete_steps(runs["stop"]) == [3, 6, 9] and not partial_dirs(runs["stop"])
    check_latest(runs["stop"])

    # continue: the error is logged loudly, the partial directory removed, training goes on
    assert cont0[0] == cont1[0] == 0, cont0[2][-3000:]
    assert "ERROR: checkpoint save failed at step 6" in cont0[1]
    assert "training continues (checkpoint.on_save_error = 'continue')" in cont0[1]
    assert complete_steps(runs["cont"]) == [3, 9] and not partial_dirs(runs["cont"])
    check_latest(runs["cont"])
    # a failed save costs no training: every step's losses equal the clean run's
    want = loss_scalars(runs["clean"])
    for name in ("stop", "cont"):
        got = loss_scalars(runs[name])
        for tag in ("loss/total", "loss/main", "loss/depth_1"):
            assert got[tag] == want[tag], (name, tag)
    record("save_error_injected_dp2", stop_exit=stop0[0], stop_steps_lost=6 - 3,
           stop_save_seconds=round(stop0[3], 2), continue_exit=cont0[0], continue_steps_lost=0)


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1.8 MB filesystem (tmpfs; needs root): room for one checkpoint of the tiny model
    (1.2 MB), not two."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1800k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_stop_then_continue(tmp_path, tmp_path_factory, tiny_fs):
    data = fault_dataset(tmp_path_factory)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(tiny_fs)  # TensorBoard stays on the big disk
    cfg = _config(data, run_dir)
    calls = [{"argv": ["train", "--config", str(cfg)]},
             {"argv": ["train", "--config", str(cfg), "--resume", "auto",
                       "checkpoint.on_save_error=continue"]}]
    (stop, cont), = run_world(cli_calls, 1, calls, timeout_s=300)

    # stop: exit 4 naming the write that failed, step 3 intact and `latest`
    assert stop[0] == EXIT_SAVE_FAILED, stop[2][-3000:]
    assert "could not write checkpoint step 6" in stop[2], stop[2]
    assert "newest complete checkpoint is step 3" in stop[2]
    assert "MiB free under" in stop[2]  # torch's own words for ENOSPC are cryptic

    # continue (same full disk): resumes from step 3, both later saves fail and are cleaned up,
    # training reaches the end; exit 4 because the final checkpoint is missing.
    assert re.search(r"^resumed from \S+step_00000003 at step 3$", cont[1], re.M), cont[1]
    assert steps_logged(cont[1]) == [4, 5, 6, 7, 8, 9]
    assert cont[1].count("ERROR: checkpoint save failed") == 2, cont[1]
    assert cont[0] == EXIT_SAVE_FAILED, cont[2][-3000:]
    assert complete_steps(run_dir) == [3] and not partial_dirs(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    first_error = re.search(r"could not write checkpoint step 6 \((.*?)\); the", stop[2]).group(1)
    record("save_error_real_tmpfs", stop_exit=stop[0], continue_exit=cont[0],
           error_seen=first_error[:300], steps_lost_stop=3, newest_complete=3)
