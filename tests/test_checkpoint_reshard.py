"""Resuming a checkpoint on another layout (TP, PP, DP size, ZeRO stage, world size): the
loaded fp32 masters and Adam moments equal the checkpoint's files exactly, and the resumed run
continues the source run's loss curve. Sources train at worlds 1, 2, 4 and 8 (TP2×PP2×DP2),
resumed at worlds 1, 2 and 4."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.sharding import tp_layout
from model.transformer import meta_parameters
from pretrain import checkpoint_state
from pretrain.checkpoint import CheckpointRef
from pretrain.checkpoint_convert import convert
from pretrain.checkpoint_state import FIELDS, SavedState
from pretrain.config import config_from_dict
from tests import dist_reshard_cases as cases
from tests.distributed import run_world
from tests.train_fixtures import build_tiny_dataset

# (source, target) pairs, grouped by the world size that resumes them.
# "tp2-as-tp1": the tp2 source's checkpoint converted offline (`mtp checkpoint convert`) for TP 1.
W1_PAIRS = [("dp2-z1", "dp1"), ("dp2-z3", "dp1"), ("tp2", "dp1"), ("pp2", "dp1"),
            ("tp2-pp2", "dp1"), ("tp2-as-tp1", "dp1")]
W2_PAIRS = [("dp1", "tp2"), ("dp1", "pp2"), ("tp2-pp2", "dp2-z3"), ("tp2", "pp2"),
            ("dp2-z1", "dp2-z3")]
W4_PAIRS = [("dp2-z1", "tp2-pp2"), ("dp2-z3", "dp4"), ("tp2-pp2-dp2", "dp4"), ("dp1", "dp4")]


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    """Sources at worlds 1, 2, 8 and 4, each pair resumed once its source exists;
    {"sources", "targets"}."""
    tmp = str(tmp_path_factory.mktemp("reshard"))
    data = str(build_tiny_dataset(tmp_path_factory.mktemp("data")))
    out = {"sources": {}, "targets": {}}
    for world, layouts, pairs in ((1, ["dp1"], []),
                                  (2, ["dp2-z1", "dp2-z3", "tp2", "pp2"], []),
                                  (8, ["tp2-pp2-dp2"], []),
                                  (4, ["tp2-pp2"], W4_PAIRS),
                                  (1, [], W1_PAIRS),
                                  (2, [], W2_PAIRS)):
        got = run_world(cases.phase, world, data, tmp, layouts, pairs, timeout_s=500)[0]
        out["sources"].update(got["sources"])
        out["targets"].update(got["targets"])
        if world == 2 and layouts:
            out["converted"] = convert(_source_ref(tmp, "tp2"), _ckpt(tmp, "tp2-as-tp1"),
                                       {"tp": 1, "dp": 1}, progress=False)
    out["sources"]["tp2-as-tp1"] = out["sources"]["tp2"]
    out["tmp"] = tmp
    return out


def _ckpt(tmp, source: str) -> Path:
    return cases.checkpoint_dir(tmp, source)


def _source_ref(tmp, source: str) -> CheckpointRef:
    ckpt = _ckpt(tmp, source)
    return CheckpointRef(ckpt.parent, ckpt.name, cases.SAVED)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def test_sources_agree_across_layouts(reshard):
    # The premise of comparing resumed curves with their source: every layout trains the same
    # run (same global batches, same weights), up to fp32 summation order.
    ref = reshard["sources"]["dp1"]
    assert [m["step"] for m in ref] == list(range(1, cases.STEPS + 1))
    for layout, curve in reshard["sources"].items():
        for got, want in zip(curve, ref):
            assert _close(got["loss/main"], want["loss/main"]), (layout, got, want)


@pytest.mark.parametrize("pair", W1_PAIRS + W2_PAIRS + W4_PAIRS, ids="->".join)
def test_resharded_resume(reshard, pair):
    source, target = pair
    got = reshard["targets"][pair]
    # Every parameter of the model (each stage its own) with master, exp_avg and exp_avg_sq.
    assert got["compared"] >= 3 * 10, got["compared"]
    assert not got["bad"], f"{source}->{target}: loaded state differs from the files: {got['bad']}"
    # The resumed steps continue the source run: same losses up to summation order (a wrong
    # moment or a shifted data position moves them by far more than 1e-5).
    resumed = got["curve"]
    assert [m["step"] for m in resumed] == list(range(cases.SAVED + 1, cases.STEPS + 1))
    src = reshard["sources"][source][cases.SAVED:]
    for a, b in zip(resumed, src):
        for key in ("loss/main", "loss/depth_1", "loss/depth_2", "optim/lr"):
            assert _close(a[key], b[key]), f"{source}->{target} step {a['step']} {key}: {a[key]} vs {b[key]}"
    # The data position came from the checkpoint (global batch 4 × SAVED steps), whatever the
    # DP size that reads it.
    if got["position"] is not None:  # rank 0 reads data unless it is a middle pipeline stage
        assert got["position"] == (4 * cases.SAVED, 4 * cases.SAVED)
    [event] = got["history"]
    assert event["event"] == "resume" and event["step"] == cases.SAVED
    assert event["to_layout"]["pp"] == cases.LAYOUTS[target]["parallel"].get("pp", 1)
    if source == "tp2-as-tp1":  # converted for exactly this layout: a plain resume
        assert event["resharded"] is False and event["from_layout"] == event["to_layout"]
    else:
        assert event["resharded"] is True
        assert event["from_layout"]["tp"] == cases.LAYOUTS[source]["parallel"].get("tp", 1)


def test_convert_writes_the_same_state_as_whole_target_shards(reshard):
    tmp = reshard["tmp"]
    assert reshard["converted"] == {"tp": 1, "pp": 1, "dp": 1, "zero": 1}
    source, converted = _ckpt(tmp, "tp2"), _ckpt(tmp, "tp2-as-tp1")
    before, after = SavedState(source), SavedState(converted)
    assert sorted(p.name for p in converted.glob("state_rank*")) == [
        "state_rank00000.json", "state_rank00000.safetensors"]
    assert not list(converted.glob("trainer_rank*"))  # RNG states belong to the old layout
    marker = json.loads((converted / "COMPLETE.json").read_text())
    assert marker["layout"] == {"world": 1, "tp": 1, "pp": 1, "dp": 1, "zero": 1}
    assert marker["converted_from"]["layout"]["tp"] == 2
    assert marker["config"]["parallel"]["tp"] == 1
    meta = meta_parameters(config_from_dict(marker["config"]).decoder)
    assert before.names() == after.names() == sorted(meta)
    split = 0
    for name in after.names():
        [piece] = after.pieces[name]  # one whole fragment per parameter
        assert piece["start"] == 0 and piece["tp_size"] == 1
        split += before.pieces[name][0]["tp_size"] == 2
        for field in FIELDS:
            assert after.has(name, field) == before.has(name, field)
            if after.has(name, field):
                assert torch.equal(after.full(name, field, None),
                                   before.full(name, field, tp_layout(meta[name])))
    assert split >= 4  # the check covered TP-split parameters, not only replicated ones


def test_a_failed_convert_leaves_the_source_and_no_output(reshard, tmp_path, monkeypatch):
    source = _ckpt(reshard["tmp"], "tp2")
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    calls = []

    def fail_on_second(*args, **kwargs):  # dies after the first rank file is written
        calls.append(args)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    real = checkpoint_state.write_safetensors
    monkeypatch.setattr(checkpoint_state, "write_safetensors", fail_on_second)
    with pytest.raises(OSError, match="No space"):
        convert(_source_ref(reshard["tmp"], "tp2"), tmp_path / "out", {"tp": 2, "dp": 2},
                progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory
    assert {p.name: p.read_bytes() for p in source.iterdir()} == files
