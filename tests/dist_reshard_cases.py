"""Rank functions for resharded resumes: source runs that checkpoint, target runs that resume
their checkpoints on other layouts and check the loaded state against the files."""

from __future__ import annotations

from pathlib import Path

LAYOUTS = {
    # name: config sections (DeepSeek D = 2 everywhere)
    "dp1": {"parallel": {"zero_stage": 1}},
    "dp2-z1": {"parallel": {"zero_stage": 1}},
    "dp2-z3": {"parallel": {"zero_stage": 3}},
    "tp2": {"parallel": {"tp": 2}},
    "pp2": {"parallel": {"pp": 2}},
    "tp2-pp2": {"parallel": {"tp": 2, "pp": 2}},
    "tp2-pp2-dp2": {"parallel": {"tp": 2, "pp": 2}},  # at world 8
    "dp4": {"parallel": {"zero_stage": 1}},
}
STEPS, SAVED = 4, 2
CONVERTED = "tp2-as-tp1"  # the tp2 source's checkpoint converted offline for TP 1


def checkpoint_dir(tmp, source: str) -> Path:
    """The step-SAVED checkpoint of `source`; the converted one sits where `mtp checkpoint
    convert --out` put it, under a name of the user's choosing."""
    from pretrain.checkpoint import tag_for

    if source == CONVERTED:
        return Path(tmp) / "converted-ckpt"
    return Path(tmp) / f"src-{source}" / "checkpoints" / tag_for(SAVED)


def _cfg(data: str, run_dir: Path, layout: str):
    from pretrain.config import config_from_dict
    from tests.dist_train_cases import LAYOUT_OPTIM
    from tests.train_fixtures import tiny_run

    sections = {**LAYOUTS[layout], "optim": LAYOUT_OPTIM,
                "train": {"steps": STEPS, "micro_batch_size": 1, "global_batch_size": 4,
                          "precision": "fp32", "log_interval": 1, "eval_interval": 0,
                          "seed": 7},
                "checkpoint": {"interval": SAVED, "keep_last": 5}}
    return config_from_dict(tiny_run(Path(data), run_dir, "deepseek", 2, **sections))


def _curve(result) -> list[dict]:
    from tests.dist_train_cases import _curve as curve

    return curve(result)


def phase(rank, world, data, tmp, layouts, pairs):
    """Train each source layout for STEPS steps, checkpointing at SAVED, then resume each
    (source, target) pair (see `targets`). Rank 0 returns {"sources": {layout: losses},
    "targets": {pair: ...}}; the other ranks None."""
    from pretrain.trainer import Trainer

    trained = {}
    for layout in layouts:
        result = Trainer(_cfg(data, Path(tmp) / f"src-{layout}", layout)).train()
        trained[layout] = _curve(result)
    resumed = targets(rank, world, data, tmp, pairs)
    return {"sources": trained, "targets": resumed} if rank == 0 else None


def _full_state(trainer) -> dict:
    """This stage's parameters as whole (TP = 1) tensors: fp32 master and both moments, gathered
    over DP (DeepSpeed's safe_get_full_* collectives) and TP."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from model.sharding import gather_tensor, tp_layout
    from pretrain.model_builder import full_parameter_names

    named, _ = full_parameter_names(trainer.engine.module)
    out = {}
    for name in sorted(named):
        p = named[name]
        for field in ("fp32", "exp_avg", "exp_avg_sq"):
            value = (safe_get_full_fp32_param(p) if field == "fp32"
                     else safe_get_full_optimizer_state(p, field))
            value = value.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                           else p.shape)
            layout = tp_layout(p)
            if layout is not None:
                value = gather_tensor(value, *layout, trainer.topo.tp_group)
            out[(name, field)] = value
    return out


def targets(rank, world, data, tmp, pairs):
    """For each (source, target) layout pair: resume the source's step-SAVED checkpoint on the
    target layout; right after the load, compare every parameter's gathered fp32 master and
    moments with the checkpoint's files (exactly), then train to STEPS. Returns, per pair, the
    number of values compared, the mismatches, the resumed losses and the history record."""
    import json

    import torch

    from model.sharding import tp_layout
    from pretrain.checkpoint_state import SavedState
    from pretrain.model_builder import full_parameter_names
    from pretrain.trainer import Trainer

    out = {}
    for source, target in pairs:
        ckpt = checkpoint_dir(tmp, source)
        run_dir = Path(tmp) / f"dst-{source}-to-{target}"
        trainer = Trainer(_cfg(data, run_dir, target), resume=str(ckpt))
        saved = SavedState(ckpt)
        named, _ = full_parameter_names(trainer.engine.module)
        compared, bad = 0, []
        for (name, field), value in _full_state(trainer).items():
            want = saved.full(name, field, tp_layout(named[name]))
            compared += 1
            if not torch.equal(value, want):
                bad.append((name, field, (value - want).abs().max().item()))
        position = None
        if trainer.train_loader is not None:
            position = (trainer.train_loader.state_dict()["samples_consumed"],
                        json.loads((ckpt / "COMPLETE.json").read_text())["data_position"]
                        ["samples_consumed"])
        result = trainer.train()
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text()
                   .splitlines()] if rank == 0 else []
        out[(source, target)] = {"compared": compared, "bad": bad, "curve": _curve(result),
                                 "history": history, "position": position}
    return out
