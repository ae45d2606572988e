"""Fault 5: bad shards, through `mtp train` (exit code and message): a shard truncated or
missing at start-up, one whose bytes no longer match the manifest's sha256 (a flipped token byte:
the tar stays readable, so only the checksum can tell), a manifest whose sha256 was edited, and a
shard that disappears or is truncated *mid-epoch*, after training started. Each is an error
naming the shard (exit 2), or with data.skip_corrupt=true a skip that is counted and reported on
stderr — never silent.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.fault_helpers import cli_calls, fault_dataset, record, steps_logged, write_config
from tests.train_fixtures import tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 20
# 16 samples a step (4 micro-batches of 4): the 20 steps read 320 samples, more than one 256-sample
# shard, so a second shard is first opened mid-run.
TRAIN = {"steps": STEPS, "micro_batch_size": 4, "global_batch_size": 16}


def _first_opened(data: Path, cfg: dict) -> dict[str, int]:
    """Shard name -> the (1-based) training step during which the loader first opens it (world 1,
    the run's seed and shuffle), so a test can damage a shard before it is read."""
    import data_pipeline.loader as loader_mod
    from data_pipeline import ShardLoader

    opened: dict[str, int] = {}
    batch = {"i": 0}
    real = loader_mod.stream_shard

    def spy(shard, *args, **kwargs):
        opened.setdefault(shard.name, batch["i"])
        return real(shard, *args, **kwargs)

    loader_mod.stream_shard = spy
    try:
        t = cfg["train"]
        ld = ShardLoader(data, "train", dp_rank=0, dp_size=1, num_workers=0,
                         batch_size=t["micro_batch_size"], seed=t["seed"], depth=2,
                         mask_cross_document=True, shuffle_buffer=cfg["data"]["shuffle_buffer"])
        for i, _ in enumerate(ld):
            batch["i"] = i + 1
            if i + 1 >= STEPS * 4:
                break
    finally:
        loader_mod.stream_shard = real
    return {name: i // 4 + 1 for name, i in opened.items()}


def _flip_token_byte(shard: Path) -> None:
    raw = bytearray(shard.read_bytes())
    raw[512 + 2] ^= 0x01  # inside the first sample's tokens: still a valid tar, in-vocab id
    shard.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    src = fault_dataset(tmp_path_factory)
    base = tmp_path_factory.mktemp("data-faults")
    probe = tiny_run(src, base / "probe", train=TRAIN)
    opened = _first_opened(src, probe)
    # first read at step 8 or later: well after the step-3 checkpoint that triggers the damage
    late = sorted(n for n, step in opened.items() if step >= 8)
    early = sorted(n for n, step in opened.items() if step == 1)
    assert late and early, opened
    victim, victim2, first = late[0], late[-1], early[0]

    cases = {}  # name -> (dataset edit, overrides, mid-run trigger)
    cases["truncated_at_start"] = (("truncate", first), [], None)
    cases["missing_at_start"] = (("unlink", first), [], None)
    cases["missing_at_start_skip"] = (("unlink", first), ["data.skip_corrupt=true"], None)
    cases["flipped_byte"] = (("flip", first), [], None)
    cases["flipped_byte_skip"] = (("flip", first), ["data.skip_corrupt=true"], None)
    cases["manifest_sha"] = (("manifest", first), [], None)
    cases["missing_mid_epoch"] = (None, [], ("unlink", victim))
    cases["truncated_mid_epoch"] = (None, [], ("truncate", victim2))
    cases["missing_mid_epoch_skip"] = (None, ["data.skip_corrupt=true"], ("unlink", victim))
    calls = []
    for name, (edit, overrides, trigger) in cases.items():
        data = base / f"data-{name}"
        shutil.copytree(src, data)
        if edit:
            op, shard = edit
            path = data / shard
            if op == "truncate":
                path.write_bytes(path.read_bytes()[:3000])
            elif op == "unlink":
                path.unlink()
            elif op == "flip":
                _flip_token_byte(path)
            elif op == "manifest":
                m = json.loads((data / "manifest.json").read_text())
                for s in m["splits"]["train"]["shards"]:
                    if s["name"] == shard:
                        s["sha256"] = "0" * 64
                (data / "manifest.json").write_text(json.dumps(m))
        run_dir = base / f"run-{name}"
        cfg = write_config(base / f"{name}.yaml", tiny_run(data, run_dir, train=TRAIN))
        call = {"argv": ["train", "--config", str(cfg), *overrides]}
        if trigger:
            call["trigger"] = {"when": str(run_dir / "checkpoints" / "step_00000003" /
                                           "COMPLETE.json"),
                               "do": trigger[0], "file": str(data / trigger[1])}
        calls.append(call)
    results = run_world(cli_calls, 1, calls, timeout_s=400)[0]
    out = dict(zip(cases, results))
    out["_shards"] = {"victim": victim, "victim2": victim2, "first": first}
    return out


def _refused(outcome, name, pattern):
    code, stdout, stderr, took = outcome[name]
    assert code == 2, (name, stderr[-3000:])
    assert re.search(pattern, stderr), (name, stderr[-3000:])
    assert "Traceback" not in stderr
    return code, stdout, stderr, took


def test_damaged_shard_at_start_is_refused_by_name(outcome):
    first = re.escape(outcome["_shards"]["first"])
    _, out, _, _ = _refused(outcome, "truncated_at_start",
                            rf"^mtp train: data error: shard {first}: has 3000 bytes but the "
                            r"manifest records \d+ \(truncated or replaced\)")
    assert not steps_logged(out)
    _refused(outcome, "missing_at_start",
             rf"^mtp train: data error: shard {first}: cannot be read \(No such file")
    _, out, _, _ = _refused(outcome, "flipped_byte",
                            rf"^mtp train: data error: shard {first}: sha256 differs")
    assert not steps_logged(out)  # refused before any step
    _refused(outcome, "manifest_sha", rf"^mtp train: data error: shard {first}: sha256 differs")


def test_skip_corrupt_counts_and_reports_the_skip(outcome):
    first = outcome["_shards"]["first"]
    for name in ("missing_at_start_skip", "flipped_byte_skip"):
        code, out, err, _ = outcome[name]
        assert code == 0, (name, err[-3000:])
        assert steps_logged(out)[-1] == STEPS
        assert re.search(rf"warning: rank 0: skipping corrupt shard {first} \(.+\); 256 samples "
                         r"skipped so far \(data.skip_corrupt = true\)", err), (name, err)


def test_shard_lost_mid_epoch_is_named_or_skipped(outcome):
    victim = re.escape(outcome["_shards"]["victim"])
    victim2 = re.escape(outcome["_shards"]["victim2"])
    measured = {}
    for name, pattern in (("missing_mid_epoch", rf"shard {victim}: is missing"),
                          ("truncated_mid_epoch", rf"shard {victim2}: is (corrupt or )?truncated")):
        code, out, err, took = _refused(outcome, name, r"^mtp train: data error: " + pattern)
        reached = max(steps_logged(out))
        assert 3 <= reached < STEPS, (name, reached)  # it happened mid-run, and stopped it
        measured[name] = {"failed_after_step": reached, "exit": code, "seconds": round(took, 2)}
    code, out, err, _ = outcome["missing_mid_epoch_skip"]
    assert code == 0, err[-3000:]
    assert steps_logged(out)[-1] == STEPS
    assert re.search(rf"warning: rank 0: skipping corrupt shard {victim} \(is missing .*\); "
                     r"\d+ samples skipped so far", err), err
    record("data_faults", **measured)
