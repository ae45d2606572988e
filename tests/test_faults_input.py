"""Faults 7 and 8: bad input, refused with a message that names the field (or file) and the fix,
a non-zero exit code, and before any work starts.

7. `mtp train` with unknown keys, wrong types (real CLI subprocesses), a layout that does not fit
   the world (torchrun world 2), batch sizes that do not divide, a tokenizer replaced after the
   shards were built, a model smaller than the tokenizer, a missing dataset, a depth the shards
   cannot feed, a checkpoint of another model and a checkpoint path that does not exist.
8. `mtp export` of an incomplete checkpoint, of one holding a file of another model, of a
   truncated file and of a missing file: exit 2 with the reason (and a good one exports).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.distributed import run_world
from tests.fault_helpers import (
    PYTHON,
    REPO,
    TORCHRUN,
    cli_calls,
    fault_dataset,
    job_env,
    record,
    steps_logged,
    write_config,
)
from tests.train_fixtures import tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BIGGER = {"hidden_size": 64, "ffn_hidden_size": 128}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    data = fault_dataset(tmp_path_factory)
    base = tmp_path_factory.mktemp("bad-input")
    three = {"steps": 3}

    def cfg(name, data_path=data, **sections):
        run = tiny_run(data_path, base / f"run-{name}", train=three)
        for key, values in sections.items():
            run[key] = {**run[key], **values}
        return str(write_config(base / f"{name}.yaml", run))

    # a tokenizer replaced after the shards were built
    bad_tok = base / "data-bad-tokenizer"
    shutil.copytree(data, bad_tok)
    tok = next(bad_tok.glob("*.model"))
    tok.write_bytes(tok.read_bytes() + b"\0")

    # real subprocesses, running alongside the in-process calls below
    procs = {
        "unknown_key": [PYTHON, "-m", "pretrain", "train", "--config", cfg("sub"),
                        "model.hiden_size=3"],
        "wrong_type": [PYTHON, "-m", "pretrain", "train", "--config", cfg("sub"),
                       "train.steps=ten"],
        "layout_torchrun": [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "pretrain",
                            "train", "--config", cfg("layout"), "parallel.tp=2", "parallel.pp=2"],
    }
    def timed(argv):
        t0 = time.monotonic()
        res = subprocess.run(argv, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300)
        return res.returncode, res.stdout, res.stdout, time.monotonic() - t0

    pool = ThreadPoolExecutor(len(procs))
    started = {k: pool.submit(timed, v) for k, v in procs.items()}

    a = base / "run-a" / "checkpoints" / "step_00000003"
    b = base / "run-b" / "checkpoints" / "step_00000003"
    state = "state_rank00000.safetensors"  # rank 0's masters and moments
    index = "state_rank00000.json"
    x = {k: base / f"export-{k}" / "step_00000003" for k in
         ("incomplete", "mixed", "truncated", "missing")}
    calls = {
        "make_a": {"argv": ["train", "--config", cfg("a")]},
        "make_b": {"argv": ["train", "--config", cfg("b", model=BIGGER)]},
        "resume_other_model": {"argv": ["train", "--config", cfg("c", model=BIGGER),
                                        "--resume", str(a)]},
        "resume_nowhere": {"argv": ["train", "--config", cfg("d"), "--resume",
                                    str(base / "no-such-run")]},
        "batch": {"argv": ["train", "--config", cfg("e"), "train.global_batch_size=5"]},
        "tokenizer": {"argv": ["train", "--config", cfg("f", data_path=bad_tok)]},
        "vocab": {"argv": ["train", "--config", cfg("g"), "model.vocab_size=256"]},
        "no_data": {"argv": ["train", "--config", cfg("h", data_path=base / "nothing-here")]},
        "depth": {"argv": ["train", "--config", cfg("i"), "mtp.depth=4"]},
        "export_incomplete": {
            "prepare": [("copytree", a, x["incomplete"]),
                        ("unlink", x["incomplete"] / "COMPLETE.json")],
            "argv": ["export", str(x["incomplete"]), "--out", str(base / "out-1")]},
        "export_mixed": {
            "prepare": [("copytree", a, x["mixed"]), ("copy", b / state, x["mixed"] / state),
                       ("copy", b / index, x["mixed"] / index)],
            "argv": ["export", str(x["mixed"]), "--out", str(base / "out-2")]},
        "export_truncated": {
            "prepare": [("copytree", a, x["truncated"]), ("truncate", x["truncated"] / state, 4000)],
            "argv": ["export", str(x["truncated"]), "--out", str(base / "out-3")]},
        "export_missing": {
            "prepare": [("copytree", a, x["missing"]), ("unlink", x["missing"] / state)],
            "argv": ["export", str(x["missing"]), "--out", str(base / "out-4")]},
        "export_good": {"argv": ["export", str(a), "--out", str(base / "out-5")]},
    }
    results = run_world(cli_calls, 1, list(calls.values()), timeout_s=400)[0]
    out = dict(zip(calls, results))
    for k, future in started.items():
        out[k] = future.result()
    pool.shutdown()
    out["_base"] = base
    return out


def _refused(outcome, name, pattern, code=2):
    rc, stdout, stderr, took = outcome[name]
    assert rc == code, (name, rc, stderr[-3000:])
    assert re.search(pattern, stderr, re.S), (name, stderr[-3000:])
    assert "Traceback" not in stderr or name == "layout_torchrun", (name, stderr[-3000:])
    assert not steps_logged(stdout), name  # refused before any work
    return took


def test_bad_config_and_cli_input_is_refused_before_any_work(outcome):
    took = {}
    took["unknown_key"] = _refused(
        outcome, "unknown_key", r"mtp train: config error: unknown key 'hiden_size' in model; "
                                r"valid keys are: vocab_size, hidden_size")
    took["wrong_type"] = _refused(outcome, "wrong_type",
                                  r"config error: train\.steps: expected an integer, got 'ten'")
    # torchrun world 2: each rank refuses (exit 2), torchrun reports it and exits 1
    took["layout_torchrun"] = _refused(
        outcome, "layout_torchrun",
        r"mtp train: error: parallel\.tp × parallel\.pp = 2 × 2 = 4 does not divide the world "
        r"size 2; choose sizes whose product divides the number of processes", code=1)
    assert "exitcode: 2" in outcome["layout_torchrun"][1]
    # said once for the job, by rank 0, not once per rank
    assert outcome["layout_torchrun"][1].count("mtp train: error: parallel.tp") == 1
    took["batch"] = _refused(outcome, "batch", r"train\.global_batch_size = 5 is not a multiple "
                                               r"of .* = 2 × 1 = 2; use e\.g\. train\.global_"
                                               r"batch_size=4")
    took["tokenizer"] = _refused(outcome, "tokenizer",
                                 r"error: data\.path = '.*': tokenizer '.*' does not match the "
                                 r"manifest's sha256 .* rebuild with `mtp prepare --overwrite`")
    took["vocab"] = _refused(outcome, "vocab", r"the dataset's tokenizer has 512 tokens but "
                                               r"model\.vocab_size = 256; set model\.vocab_size "
                                               r">= 512")
    took["no_data"] = _refused(outcome, "no_data", r"data\.path = '.*nothing-here': no dataset "
                                                   r"manifest .* build one with `mtp prepare`")
    took["depth"] = _refused(outcome, "depth", r"mtp\.depth = 4 but the dataset .* max_depth 3; "
                                               r"rebuild it with `mtp prepare --max-depth 4`")
    took["resume_other_model"] = _refused(
        outcome, "resume_other_model",
        r"cannot resume from \S+step_00000003: the checkpoint was written by an incompatible "
        r"run \(model\.hidden_size: checkpoint 32, now 64; model\.ffn_hidden_size: "
        r"checkpoint 64, now 128\); resume with the checkpoint's settings")
    took["resume_nowhere"] = _refused(outcome, "resume_nowhere",
                                      r"error: no complete checkpoint under \S+no-such-run")
    runs = {"batch": "e", "tokenizer": "f", "vocab": "g", "no_data": "h", "depth": "i",
            "resume_other_model": "c"}
    for name, letter in runs.items():  # no run files, no checkpoint: nothing was done
        run = outcome["_base"] / f"run-{letter}"
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists(), name
    record("bad_input_refusal_seconds", **{k: round(v, 2) for k, v in took.items()})


def test_export_refuses_incomplete_or_foreign_checkpoints(outcome):
    assert outcome["make_a"][0] == 0 and outcome["make_b"][0] == 0
    _refused(outcome, "export_incomplete", r"mtp export: error: \S+step_00000003 is an incomplete "
                                           r"checkpoint \(no COMPLETE\.json")
    _refused(outcome, "export_mixed",
             r"mtp export: error: \S+step_00000003 does not match the model its own config "
             r"describes \(wrong or mixed files\?\): .*: shape \(\d+, 64\) but the config "
             r"implies \(\d+, 32\)")
    _refused(outcome, "export_truncated", r"mtp export: error: \S+state_rank00000\.safetensors is "
                                          r"unreadable \(.*\); the checkpoint is damaged")
    _refused(outcome, "export_missing", r"mtp export: error: \S+step_00000003 lacks "
                                        r"state_rank00000\.safetensors \(its index "
                                        r"state_rank00000\.json is there\)")
    assert outcome["export_good"][0] == 0, outcome["export_good"][2][-2000:]
    for k in range(1, 5):
        assert not (outcome["_base"] / f"out-{k}").exists()  # nothing half-exported
