"""Rank functions running the real Trainer in gloo worlds."""

from __future__ import annotations

from pathlib import Path

KEYS = ("loss/total", "loss/main", "loss/depth_1", "loss/depth_2", "accuracy/depth_0",
        "optim/grad_norm", "optim/lr", "mtp/lambda")


def _curve(result) -> list[dict]:
    return [{k: m[k] for k in KEYS if k in m} | {"step": m["step"]} for m in result.losses]


def reference_runs(rank, world, data, tmp, kinds, dp_sizes):
    """World 1: for each kind and data-parallel size, the single-process run fed the same global
    batches as that many DP ranks would read."""
    from data_pipeline import ShardLoader
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import MergedLoader, tiny_run

    out = {}
    for kind in kinds:
        for dp in dp_sizes:
            cfg = config_from_dict(tiny_run(Path(data), Path(tmp) / f"ref-{kind}-dp{dp}", kind))
            loaders = [ShardLoader(cfg.data.path, "train", dp_rank=r, dp_size=dp, num_workers=0,
                                   batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                                   depth=cfg.mtp.depth, mask_cross_document=True,
                                   shuffle_buffer=cfg.data.shuffle_buffer) for r in range(dp)]
            per_rank = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
            result = Trainer(cfg, train_loader=MergedLoader(loaders, per_rank)).train()
            out[(kind, dp)] = _curve(result)
    return out


def layout_runs(rank, world, data, tmp, name, sections, kinds):
    """For each kind: an uninterrupted 6-step run (checkpoints at 3 and 6), then a second run that
    resumes from the step-3 checkpoint. Returns both loss curves from rank 0."""
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    out = {}
    for kind in kinds:
        run_a = Path(tmp) / f"{name}-{kind}-a"
        a = Trainer(config_from_dict(tiny_run(Path(data), run_a, kind, **sections))).train()
        b_cfg = config_from_dict(tiny_run(Path(data), Path(tmp) / f"{name}-{kind}-b", kind, **sections))
        b = Trainer(b_cfg, resume=str(run_a / "checkpoints" / "step_00000003")).train()
        out[kind] = {"a": _curve(a), "b": _curve(b)}
    return out if rank == 0 else None
