"""Sharded DeepSpeed checkpoints that are complete or ignored.

Layout: RUN/checkpoints/step_XXXXXXXX/ holds DeepSpeed's model and ZeRO optimizer shards (with
the trainer state and resolved config as client state), one `trainer_rankNNNNN.pt` per rank (RNG
states and that rank's data-loader position), and, written last by rank 0 once every rank has
finished, `COMPLETE.json`. Only directories with that marker count: a crash during a save leaves
an unmarked directory that resume ignores and the next save prunes. `latest` (read by DeepSpeed's
tools such as zero_to_fp32) is replaced atomically after the marker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import accelerator

COMPLETE = "COMPLETE.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank (disk full, write error): raised on every rank alike, after the
    partial directory was left unmarked (and removed with `remove_partial`)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


@dataclass(frozen=True)
class CheckpointRef:
    root: Path
    tag: str
    step: int

    @property
    def path(self) -> Path:
        return self.root / self.tag

    def marker(self) -> dict:
        try:
            return json.loads((self.path / COMPLETE).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path / COMPLETE} is unreadable ({err}); use another "
                                  "checkpoint") from None


def complete_checkpoints(root: Path) -> list[CheckpointRef]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    refs = []
    for p in root.iterdir():
        step = _step_of(p)
        if step is not None and (p / COMPLETE).is_file():
            refs.append(CheckpointRef(root, p.name, step))
    return sorted(refs, key=lambda r: r.step)


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A checkpoint directory itself, or a run directory / checkpoints root (newest complete)."""
    p = Path(path)
    if (p / COMPLETE).is_file() and _step_of(p) is not None:
        return CheckpointRef(p.parent, p.name, _step_of(p))
    if _step_of(p) is not None and p.is_dir():
        raise CheckpointError(
            f"{p} is an incomplete checkpoint (no {COMPLETE}: its save did not finish); use an "
            "earlier one or the run directory to pick the newest complete one")
    for root in (p / "checkpoints", p):
        refs = complete_checkpoints(root)
        if refs:
            return refs[-1]
    if not p.exists():
        why = "it does not exist"
    elif not p.is_dir():
        why = "it is a file, not a run or checkpoint directory"
    else:
        partial = sorted(c.name for root in (p / "checkpoints", p) if root.is_dir()
                         for c in root.iterdir() if _step_of(c) is not None)
        why = (f"it holds only incomplete ones ({', '.join(partial[-3:])}: no {COMPLETE}, their "
               "saves did not finish)" if partial else
               "it holds no checkpoints (a run directory keeps them in checkpoints/step_*)")
    raise CheckpointError(f"no complete checkpoint under {p}: {why}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), **accelerator.rng_state()}


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    accelerator.set_rng_state(state)


def parameters_finite(module: torch.nn.Module) -> bool:
    """True when every parameter on every rank is finite (a collective over the world)."""
    bad = torch.zeros(1, device=accelerator.current_device())
    for p in module.parameters():
        if p.numel() and not torch.isfinite(p.detach()).all():
            bad += 1
            break
    dist.all_reduce(bad)
    return bad.item() == 0


def _guard_writes(engine, errors: list[str]):
    """Make DeepSpeed's file writes record their failure instead of raising, so that a rank whose
    write fails still walks through DeepSpeed's remaining collectives with its peers (an exception
    in the middle of `engine.save_checkpoint` would leave them waiting in its final barrier).
    Returns the undo function."""
    ce = engine.checkpoint_engine
    real = ce.save

    def save(state_dict, path, *args, **kwargs):
        if errors:
            return None  # one failure decides; do not keep writing to a full disk
        try:
            return real(state_dict, path, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - torch.save reports ENOSPC as RuntimeError
            errors.append(f"{path}: {type(err).__name__}: {err}")
            return None

    ce.save = save
    return lambda: ce.__dict__.pop("save", None)


def _any_rank(failed: bool) -> bool:
    """Collective (also the barrier between the save's phases): did any rank fail?"""
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.current_device())
    dist.all_reduce(flag)
    return flag.item() > 0


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, rank_state: dict,
                    marker: dict, keep_last: int, remove_partial: bool = False) -> CheckpointRef:
    """Collective: every rank calls it. Refuses to save non-finite weights.

    A write error on any rank (disk full, I/O error) raises CheckpointSaveError on every rank:
    the step's directory gets no marker (so resume keeps using the previous checkpoint and
    `latest` keeps naming it), and with `remove_partial` rank 0 deletes it."""
    if not parameters_finite(engine.module):
        raise CheckpointError(
            f"refusing to save step {step}: the weights hold non-finite values; the previous "
            "checkpoint is kept")
    tag = tag_for(step)
    rank = dist.get_rank()
    path = root / tag
    errors: list[str] = []
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            # A marker left from an earlier life of this step would make a partial rewrite look whole.
            (path / COMPLETE).unlink(missing_ok=True)
        except OSError as err:
            errors.append(f"{path}: {err}")
    if not _any_rank(bool(errors)):
        undo = _guard_writes(engine, errors)
        try:
            engine.save_checkpoint(str(root), tag=tag, client_state={"trainer": trainer_state},
                                   save_latest=False)
        finally:
            undo()
        if not errors:
            try:
                path.mkdir(parents=True, exist_ok=True)
                torch.save({"rng": rng_states(), **rank_state}, path / f"trainer_rank{rank:05d}.pt")
            except Exception as err:  # noqa: BLE001 - see _guard_writes
                errors.append(f"{path / f'trainer_rank{rank:05d}.pt'}: {type(err).__name__}: {err}")
    if not _any_rank(bool(errors)) and rank == 0:
        try:
            _atomic_write(path / COMPLETE, json.dumps(
                {"format": FORMAT_VERSION, "step": step, "time": time.time(), **marker}, indent=1))
            _atomic_write(root / "latest", tag)
        except OSError as err:
            errors.append(f"{path / COMPLETE}: {err}")
            (path / COMPLETE).unlink(missing_ok=True)  # complete means every write succeeded
        else:
            _prune(root, keep_last)
    if _any_rank(bool(errors)):
        if rank == 0 and remove_partial:
            shutil.rmtree(path, ignore_errors=True)
        if remove_partial:
            dist.barrier()  # the directory is gone before any rank goes on
        previous = [r.step for r in complete_checkpoints(root) if r.step != step]
        try:  # torch.save reports a full disk as "unexpected pos N vs M": say how full it is
            free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise CheckpointSaveError(
            f"could not write checkpoint step {step} ({'; '.join(errors) or 'on another rank'}; "
            f"{free} under {root}); "
            f"the partial directory {path} was {'removed' if remove_partial else 'left unmarked'}, "
            f"and the newest complete checkpoint is "
            f"{f'step {previous[-1]}' if previous else 'none'}. Free space under {root} "
            "(or move run_dir) and resume with --resume auto")
    return CheckpointRef(root, tag, step)


def _prune(root: Path, keep_last: int) -> None:
    refs = complete_checkpoints(root)
    newest = refs[-1].step
    for ref in refs[:-keep_last]:
        # Unmark first: a crash half-way through the rmtree must not leave a gutted directory
        # that still counts as complete.
        (ref.path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(ref.path, ignore_errors=True)
    for p in root.iterdir():  # incomplete leftovers of crashed saves
        step = _step_of(p)
        if step is not None and step < newest and not (p / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, ref: CheckpointRef) -> tuple[dict, dict]:
    """Collective. Returns (trainer_state, this rank's state)."""
    rank = dist.get_rank()
    rank_file = ref.path / f"trainer_rank{rank:05d}.pt"
    if _any_rank(not rank_file.is_file()):  # every rank refuses alike, not only the one short
        raise CheckpointError(
            f"{ref.path} lacks the trainer state of some rank (trainer_rankNNNNN.pt, one per "
            f"rank of {dist.get_world_size()}): the checkpoint is damaged; resume from another "
            "one (pass its directory to --resume)")
    path, client = engine.load_checkpoint(
        str(ref.root), tag=ref.tag, load_optimizer_states=True, load_lr_scheduler_states=False,
        load_module_strict=True)
    if path is None or client is None or "trainer" not in client:
        raise CheckpointError(f"DeepSpeed could not load {ref.path}")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return client["trainer"], rank_state


def resume_differences(marker: dict, cfg, layout) -> list[str]:
    """What differs between a checkpoint (its COMPLETE.json) and the run about to resume from it,
    in ways a resume cannot bridge; empty when it can resume."""
    now, saved = cfg.to_dict(), marker["config"]
    diffs = []
    for section in ("model", "mtp"):
        for key, value in now[section].items():
            old = saved[section].get(key)
            if old != value:
                diffs.append(f"{section}.{key}: checkpoint {old!r}, now {value!r}")
    for key in ("tp", "pp", "zero_stage"):
        old = saved["parallel"][key]
        if old != now["parallel"][key]:
            diffs.append(f"parallel.{key}: checkpoint {old}, now {now['parallel'][key]}")
    if marker["layout"]["dp"] != layout.dp:
        diffs.append(f"data-parallel size: checkpoint {marker['layout']['dp']}, now {layout.dp} "
                     "(ZeRO optimizer shards are per data-parallel rank)")
    for key in ("micro_batch_size", "global_batch_size", "seed"):
        old = saved["train"][key]
        if old != now["train"][key]:
            diffs.append(f"train.{key}: checkpoint {old}, now {now['train'][key]}")
    return diffs
