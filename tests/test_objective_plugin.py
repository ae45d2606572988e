"""The objective registry is the only seam a new MTP objective needs: a toy fourth objective,
defined in this file alone, trains under TP = 2 × PP = 2 like the single-process run, checkpoints
and resumes bit for bit, exports with its tail, and drafts in self-speculative decoding with
output identical to plain greedy decoding.

The toy ("linear"): one bias-free linear head per extra depth on the final-norm output,
hⱼ = Wⱼ z, scored by the shared head. Its classes are defined (and so registered) inside the
processes that use it, never in the test runner itself: registering in the runner would make the
registry, and with it the suite's parametrization over objectives, depend on test order.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests import dist_train_cases as cases
from tests.distributed import run_world
from tests.train_fixtures import build_tiny_dataset, tiny_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KIND, DEPTH = "linear", 2


def register_linear_heads() -> None:
    """Define and register the toy objective and its drafter (idempotent)."""
    import torch
    from torch import nn

    from model.generation.drafters import Drafter
    from model.mtp import MTPObjective, objective_kinds

    if KIND in objective_kinds():
        return

    class LinearDrafter(Drafter):
        def catch_up(self, tokens, trunk, normed, m):
            z = normed[torch.arange(normed.shape[0], device=self.device), m - 1]  # [B, d]
            picks = [self._pick(head(z))
                     for head in self.model.tail.objective.heads]
            return self._stacked([t for t, _ in picks], [p for _, p in picks])

    class LinearHeads(MTPObjective, kind=KIND):
        drafter = LinearDrafter

        def __init__(self, dcfg, ctx):
            super().__init__(dcfg, ctx)
            d = dcfg.model.hidden_size
            self.heads = nn.ModuleList(nn.Linear(d, d, bias=False)
                                       for _ in range(dcfg.mtp.depth))

        def depth_hiddens(self, x):
            return [(j, head(x.main)) for j, head in enumerate(self.heads, start=1)]


def _sections(parallel: dict) -> dict:
    return {"parallel": parallel, "optim": cases.LAYOUT_OPTIM,
            "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 4,
                      "precision": "fp32", "log_interval": 1, "eval_interval": 0, "seed": 7},
            "checkpoint": {"interval": 2, "keep_last": 5}}


def train_tp2_pp2(rank, world, data, tmp):
    """World 4: an uninterrupted run (checkpoints at steps 2 and 4) and one resumed at step 2."""
    register_linear_heads()
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer

    sections = _sections({"tp": 2, "pp": 2})
    run_a, run_b = Path(tmp) / "tp2pp2-a", Path(tmp) / "tp2pp2-b"
    a = Trainer(config_from_dict(tiny_run(Path(data), run_a, KIND, DEPTH, **sections))).train()
    b = Trainer(config_from_dict(tiny_run(Path(data), run_b, KIND, DEPTH, **sections)),
                resume=str(run_a / "checkpoints" / "step_00000002")).train()
    return {"a": cases._curve(a), "b": cases._curve(b)} if rank == 0 else None


def reference_export_and_decode(rank, world, data, tmp):
    """World 1: the single-process run; then the TP2×PP2 checkpoint exported with its tail,
    compared with the reference weights, and decoded plainly and speculatively."""
    register_linear_heads()
    import torch

    from model.generation import generate, generate_speculative
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.config import config_from_dict
    from pretrain.export.files import load_exported_model
    from pretrain.export.from_checkpoint import export_checkpoint, full_state_dict_from_checkpoint
    from pretrain.export.loading import load_for_inference
    from pretrain.trainer import Trainer

    ref_dir = Path(tmp) / "reference"
    ref = Trainer(config_from_dict(tiny_run(Path(data), ref_dir, KIND, DEPTH,
                                            **_sections({"tp": 1, "pp": 1})))).train()
    _, want = full_state_dict_from_checkpoint(resolve_checkpoint(ref_dir))
    out = Path(tmp) / "export"
    export_checkpoint(resolve_checkpoint(Path(tmp) / "tp2pp2-a"), out, with_mtp=True,
                      dtype=None, overwrite=False)
    dcfg, got = load_exported_model(out)
    weight_diff = max((got[n] - want[n]).abs().max().item() for n in want)

    loaded = load_for_inference(out, torch.float32)
    prompts = [[5, 17, 9], [7, 8]]  # within the tiny context: prompt + new + 2·drafts + 2 ≤ 16
    plain = generate(loaded.model, prompts, 5, graphs=False)
    spec = generate_speculative(loaded.model, prompts, 5, graphs=False)
    return {"reference": cases._curve(ref), "tail_kind": (dcfg.mtp.kind, dcfg.mtp.depth),
            "tail_tensors": sorted(n for n in got if n.startswith("tail.objective.")),
            "weight_diff": weight_diff, "plain": plain.tokens, "speculative": spec.tokens,
            "tokens_per_forward": spec.stats.mean_tokens_per_forward()}


def test_a_new_objective_needs_nothing_but_its_own_file(tmp_path):
    data = build_tiny_dataset(tmp_path / "data")
    runs = run_world(train_tp2_pp2, 4, str(data), str(tmp_path), timeout_s=300)[0]
    (res,) = run_world(reference_export_and_decode, 1, str(data), str(tmp_path), timeout_s=300)

    a, b, ref = runs["a"], runs["b"], res["reference"]
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    for got, want in zip(a, ref):  # TP2×PP2 trains like the single-process run
        for key, value in want.items():
            rel = 1e-4 if key == "optim/grad_norm" else 1e-5
            assert math.isclose(got[key], value, rel_tol=rel, abs_tol=1e-7), (got, want, key)
    assert b == a[2:], "the resumed run differs from the uninterrupted one"
    assert a[-1]["loss/depth_1"] < a[0]["loss/depth_1"]  # the heads learn

    assert res["tail_kind"] == (KIND, DEPTH)
    assert res["tail_tensors"] == [f"tail.objective.heads.{j}.weight" for j in range(DEPTH)]
    assert res["weight_diff"] < 1e-4  # TP shards and pipeline layers reassembled in place
    assert res["speculative"] == res["plain"]
    assert res["tokens_per_forward"] >= 1.0
