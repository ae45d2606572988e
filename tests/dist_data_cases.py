"""Rank functions for the data-source tests that run the real Trainer (gloo world of 1)."""

from __future__ import annotations

import json
from pathlib import Path


def _scalars(run_dir: Path, prefixes: tuple[str, ...]) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefixes):
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def mixture_training(rank, world, sources, tmp):
    """A 4-step run on a two-source mixture (validation at step 2 and 4, checkpoints at 2 and 4),
    then a run resumed from step 2. Returns what the tests compare."""
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    def cfg(name):
        run = tiny_run(Path(sources[0]["path"]), Path(tmp) / name,
                       train={"steps": 4, "eval_interval": 2, "eval_batches": 1},
                       checkpoint={"interval": 2, "keep_last": 5})
        run["data"].update(path="", sources=sources)
        return config_from_dict(run)

    a = Trainer(cfg("a")).train()
    b = Trainer(cfg("b"), resume=str(Path(tmp) / "a" / "checkpoints" / "step_00000002")).train()
    marker = json.loads((Path(tmp) / "a" / "checkpoints" / "step_00000004" /
                         "COMPLETE.json").read_text())
    return {"a": [{k: v for k, v in m.items() if k.startswith("loss/")} for m in a.losses],
            "b": [{k: v for k, v in m.items() if k.startswith("loss/")} for m in b.losses],
            "validation": a.validation,
            "tensorboard": _scalars(Path(tmp) / "a", ("data/", "val/")),
            "position": marker["data_position"]}
