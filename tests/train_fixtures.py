"""A tiny real dataset and tiny run configs for the training tests."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

VOCAB = 512
SEQ = 16
MAX_DEPTH = 3


def build_tiny_dataset(root: Path, max_depth: int = MAX_DEPTH, seq_len: int = SEQ,
                       shard_samples: int = 256) -> Path:
    """Shards of a few stdlib packages (real code), vocab 512, windows of seq_len (16) +
    max_depth + 1."""
    from data_pipeline import BuildConfig, build_dataset

    src = root / "corpus"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email", "html"):
        shutil.copytree(stdlib / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = root / "data"
    build_dataset(BuildConfig(source=str(src), out_dir=out, vocab_size=VOCAB, seq_len=seq_len,
                              max_depth=max_depth, val_fraction=0.05, shard_samples=shard_samples,
                              num_workers=1, progress=False))
    return out


def tiny_run(data_path: Path, run_dir: Path, kind: str = "deepseek", depth: int = 2,
             **sections) -> dict:
    """A run-config mapping; `sections` update whole sections, e.g. parallel={"tp": 2}."""
    cfg = {
        "run_dir": str(run_dir),
        "model": dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, max_seq_len=SEQ, loss_chunk_tokens=24),
        "mtp": dict(kind=kind, depth=0 if kind == "none" else depth),
        "mtp_weight": dict(values=[0.5, 0.2], boundaries_tokens=[3 * 4 * SEQ]),
        "parallel": dict(tp=1, pp=1, zero_stage=1),
        "data": dict(path=str(data_path), num_workers=0, shuffle_buffer=64),
        "optim": dict(lr=1e-2, min_lr=1e-3, warmup_steps=2, grad_clip=1.0),
        "train": dict(steps=6, micro_batch_size=2, global_batch_size=4, seed=7, precision="fp32",
                      log_interval=1, eval_interval=0),
        "checkpoint": dict(interval=3, keep_last=5),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


class MergedLoader:
    """Feeds one process the micro-batches that `len(loaders)` data-parallel ranks would read,
    `per_rank` of each per optimizer step, so a single-process run sees the same global batch."""

    def __init__(self, loaders, per_rank: int):
        self.loaders, self.per_rank = loaders, per_rank

    def __iter__(self):
        its = [iter(loader) for loader in self.loaders]
        while True:
            for it in its:
                for _ in range(self.per_rank):
                    yield next(it)

    def state_dict(self):
        return {"per_rank": [loader.state_dict() for loader in self.loaders]}


def loss_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value for the loss/* scalars of every event file in RUN_DIR/tensorboard;
    where a step was logged more than once (by an earlier life of the job) the last write wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[str, list] = {}
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files in {run_dir / 'tensorboard'}"
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("loss/"):
                events.setdefault(tag, []).extend(acc.Scalars(tag))
    out = {}
    for tag, evs in events.items():
        out[tag] = {}
        for ev in sorted(evs, key=lambda e: e.wall_time):
            out[tag][ev.step] = ev.value
    return out
