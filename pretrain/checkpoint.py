"""Sharded checkpoints that are complete or ignored, and resume onto any layout.

Layout: RUN/checkpoints/step_XXXXXXXX/ holds every rank's fragments of the fp32 master weights
and Adam moments (pretrain/checkpoint_state.py: layout-free, any TP × PP × DP and ZeRO stage
resumes from them), one `trainer_rankNNNNN.pt` per rank (its RNG states), and, written last by
rank 0 once every rank has finished, `COMPLETE.json` (the trainer state, the data position, the
resolved config and the layout). Only directories with that marker count: a crash during a save
leaves an unmarked directory that resume ignores and the next save prunes. `latest` names the
newest complete checkpoint and is replaced atomically after the marker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import accelerator
from pretrain.checkpoint_state import (
    HostBuffers,
    SavedState,
    fragment_layout,
    link_optimizer_state,
    load_into,
    snapshot,
    write_rank_files,
)

COMPLETE = "COMPLETE.json"
FORMAT_VERSION = 2  # 2: layout-free state files (1: DeepSpeed's own checkpoint files)


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank (disk full, write error): raised on every rank alike, after the
    partial directory was left unmarked (and removed with `remove_partial`). `step`: the
    checkpoint's step (a background save's failure surfaces at a later step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


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
    if (p / COMPLETE).is_file():
        step = _step_of(p)
        if step is None:  # named otherwise, e.g. `mtp checkpoint convert --out DIR`
            step = CheckpointRef(p.parent, p.name, 0).marker().get("step")
            if not isinstance(step, int):
                raise CheckpointError(f"{p / COMPLETE} records no step; use another checkpoint")
        return CheckpointRef(p.parent, p.name, step)
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
    # One flag per parameter, summed on the device: no host synchronisation per parameter.
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters() if p.numel()]
    bad = torch.zeros(1, device=accelerator.current_device())
    if flags:
        bad += torch.stack(flags).logical_not().sum().to(bad.device)
    dist.all_reduce(bad)
    return bad.item() == 0


def _any_rank(failed: bool) -> bool:
    """Collective (also the barrier between the save's phases): did any rank fail?"""
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.current_device())
    dist.all_reduce(flag)
    return flag.item() > 0


@dataclass
class SaveRequest:
    """What one save writes: where, and what each rank holds (host copies of its fragments,
    made before the call returns, so training may change the weights while files are
    written)."""

    root: Path
    step: int
    rank: int
    world: int
    index: dict
    tensors: dict
    rank_state: dict
    marker: dict
    keep_last: int
    remove_partial: bool
    wait_timeout_s: float

    @property
    def path(self) -> Path:
        return self.root / tag_for(self.step)


def _write_rank(req: SaveRequest) -> None:
    """This rank's files, fsynced, then a DONE file that says so (rank 0 waits for them)."""
    path = req.path
    path.mkdir(parents=True, exist_ok=True)
    write_rank_files(path, req.rank, req.index, req.tensors)
    torch.save({"rng": req.rank_state}, path / f"trainer_rank{req.rank:05d}.pt")
    for name in (f"state_rank{req.rank:05d}.safetensors", f"state_rank{req.rank:05d}.json",
                 f"trainer_rank{req.rank:05d}.pt"):
        with open(path / name, "rb") as fh:
            os.fsync(fh.fileno())
    _atomic_write(path / f"DONE_rank{req.rank:05d}", "ok")


def _mark_complete(req: SaveRequest) -> None:
    """Rank 0: the marker, once every rank's DONE file is there; then `latest` and pruning."""
    deadline = time.monotonic() + req.wait_timeout_s
    path = req.path
    while True:
        failed = sorted(path.glob("FAILED_rank*"))
        if failed:
            raise CheckpointSaveError(f"{failed[0].name}: {failed[0].read_text().strip()}")
        if len(list(path.glob("DONE_rank*"))) == req.world:
            break
        if time.monotonic() > deadline:
            raise CheckpointSaveError(f"not every rank finished writing {path} within "
                                      f"{req.wait_timeout_s:.0f} s")
        time.sleep(0.05)
    _atomic_write(path / COMPLETE, json.dumps(
        {"format": FORMAT_VERSION, "step": req.step, "time": time.time(), **req.marker},
        indent=1))
    for done in path.glob("DONE_rank*"):
        done.unlink(missing_ok=True)
    _atomic_write(req.root / "latest", tag_for(req.step))
    _prune(req.root, req.keep_last)


def _run_save(req: SaveRequest) -> str | None:
    """The writing part of a save (on the training thread, or the background one). Returns what
    went wrong on this rank, or None."""
    try:
        _write_rank(req)
    except Exception as err:  # noqa: BLE001 - torch/safetensors report ENOSPC as RuntimeError
        message = f"{req.path}: {type(err).__name__}: {err}"
        try:
            _atomic_write(req.path / f"FAILED_rank{req.rank:05d}", message)
        except OSError:
            pass
        return message
    if req.rank == 0:
        try:
            _mark_complete(req)
        except (OSError, CheckpointSaveError) as err:
            (req.path / COMPLETE).unlink(missing_ok=True)
            return f"{req.path}: {err}"
    return None


class CheckpointWriter:
    """Saves checkpoints, synchronously or in the background (checkpoint.async_save).

    In the background: the call returns once this rank's fragments are copied to host memory;
    a thread writes them and a DONE file, and rank 0's thread writes COMPLETE.json when every
    rank's DONE file is there (no collective runs off the training thread). A save waits for
    the previous one first, and a failure of the previous one is reported then, on every rank
    alike (or at `finish`): its directory has no marker, so resume keeps using the checkpoint
    before it.
    """

    def __init__(self, pinned: bool = False):
        """`pinned`: page-locked host copies (GPUs; see checkpoint_state.HostBuffers)."""
        self._buffers = HostBuffers(pinned)
        self._thread: threading.Thread | None = None
        self._pending: SaveRequest | None = None
        self._error: str | None = None
        self._reserving: threading.Thread | None = None
        self._stop_reserving = threading.Event()
        self.reserved: tuple[float, float] | None = None
        """(GiB, seconds) of the host buffers `prepare` allocated, once it has finished."""
        self.reserve_error: str | None = None
        self.written: tuple[int, float] | None = None
        """(step, seconds) of the last background save, once this rank has written it (on rank
        0: once COMPLETE.json is there); see take_written."""

    def prepare(self, owners) -> int:
        """Allocate this rank's host buffers on a helper thread, so the first background save
        pauses training no longer than the later ones: page-locking the 47 GiB of an 8B rank
        took 20 s on an H200 host, and while it runs the training thread's device calls wait
        (benchmarks/RESULTS.md). Called at start-up, it overlaps compilation and the first
        step; the first save waits for it if it is still running. Returns the bytes it
        reserves."""
        layout = fragment_layout(owners)

        def reserve() -> None:
            t0 = time.perf_counter()
            try:
                self._buffers.reserve(layout, self._stop_reserving)
            except (RuntimeError, MemoryError) as err:
                # Page-locking more would fail again inside a save: the rest goes to pageable
                # memory (synchronous copies, correct, slower).
                self._buffers.pinned = False
                self.reserve_error = f"{type(err).__name__}: {err}"
            self.reserved = (self._buffers.reserved_bytes / 2**30, time.perf_counter() - t0)

        self._reserving = threading.Thread(target=reserve, name="checkpoint-buffers", daemon=True)
        self._reserving.start()
        return sum(numel * dtype.itemsize for _, numel, dtype in layout)

    def take_reserved(self) -> tuple[float, float, str | None] | None:
        """(GiB, seconds, error) of the finished reservation, once; None before or after."""
        if self.reserved is None:
            return None
        (gib, seconds), self.reserved = self.reserved, None
        return gib, seconds, self.reserve_error

    def take_written(self) -> tuple[int, float] | None:
        """(step, seconds) of the last background save on disk, once; None otherwise."""
        written, self.written = self.written, None
        return written

    def _wait_reserved(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def _join(self) -> SaveRequest | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        req, self._pending = self._pending, None
        return req

    def wait_local(self) -> None:
        """Wait for this rank's background writing, without the collective of `finish` (for
        shutting down after a failure, when the peers may be gone). A reservation still
        running stops after its current slab: the process must not exit while it allocates."""
        self._stop_reserving.set()
        self._wait_reserved()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Collective: wait for a background save; CheckpointSaveError on every rank if it
        failed on any."""
        req = self._join()
        error, self._error = self._error, None
        if _any_rank(error is not None) and req is not None:
            self._fail(req, error)

    def save(self, engine, owners, root: Path, step: int, trainer_state: dict, marker: dict,
             keep_last: int, remove_partial: bool = False, background: bool = False,
             wait_timeout_s: float = 600) -> CheckpointRef:
        """Collective: every rank calls it. Refuses to save non-finite weights. A write error on
        any rank (disk full, I/O error) raises CheckpointSaveError on every rank (for a
        background save: at the next save or at `finish`): the step's directory gets no marker
        (so resume keeps using the previous checkpoint and `latest` keeps naming it), and with
        `remove_partial` rank 0 deletes it."""
        self.finish()
        self._wait_reserved()
        if not parameters_finite(engine.module):
            raise CheckpointError(
                f"refusing to save step {step}: the weights hold non-finite values; the previous "
                "checkpoint is kept")
        rank, path = dist.get_rank(), root / tag_for(step)
        errors = []
        if rank == 0:
            try:
                path.mkdir(parents=True, exist_ok=True)
                # A marker left from an earlier life of this step would make a partial rewrite
                # look whole; so would DONE/FAILED files.
                for stale in (COMPLETE, *(p.name for p in path.glob("DONE_rank*")),
                              *(p.name for p in path.glob("FAILED_rank*"))):
                    (path / stale).unlink(missing_ok=True)
            except OSError as err:
                errors.append(f"{path}: {err}")
        req = None
        if not _any_rank(bool(errors)):
            link_optimizer_state(engine.optimizer)
            index, tensors = snapshot(owners, self._buffers)
            req = SaveRequest(root, step, rank, dist.get_world_size(), index, tensors,
                              rng_states(), {**marker, "trainer": trainer_state}, keep_last,
                              remove_partial, wait_timeout_s)
            if background:
                self._pending = req
                self._thread = threading.Thread(target=self._background, args=(req,),
                                                name=f"checkpoint-{step}", daemon=True)
                self._thread.start()
                return CheckpointRef(root, tag_for(step), step)
            error = _run_save(req)
            if error:
                errors.append(error)
        if _any_rank(bool(errors)):
            self._fail(req or SaveRequest(root, step, rank, dist.get_world_size(), {}, {}, {},
                                          {}, keep_last, remove_partial, wait_timeout_s),
                       "; ".join(errors) or None)
        return CheckpointRef(root, tag_for(step), step)

    def _background(self, req: SaveRequest) -> None:
        t0 = time.perf_counter()
        self._error = _run_save(req)
        if self._error is None:
            self.written = (req.step, time.perf_counter() - t0)

    def _fail(self, req: SaveRequest, error: str | None) -> None:
        """Collective: the failed save's directory unmarked (removed with remove_partial), and
        CheckpointSaveError raised on every rank."""
        path, root, rank = req.path, req.root, dist.get_rank()
        if rank == 0:
            (path / COMPLETE).unlink(missing_ok=True)
            if req.remove_partial:
                shutil.rmtree(path, ignore_errors=True)
        if req.remove_partial:
            dist.barrier()  # the directory is gone before any rank goes on
        previous = [r.step for r in complete_checkpoints(root) if r.step != req.step]
        try:  # a full disk shows as "unexpected pos N vs M" or an OSError: say how full it is
            free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise CheckpointSaveError(
            f"could not write checkpoint step {req.step} ({error or 'on another rank'}; {free} "
            f"under {root}); the partial directory {path} was "
            f"{'removed' if req.remove_partial else 'left unmarked'}, and the newest complete "
            f"checkpoint is {f'step {previous[-1]}' if previous else 'none'}. Free space under "
            f"{root} (or move run_dir) and resume with --resume auto", req.step)


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


def load_checkpoint(engine, owners, ref: CheckpointRef, same_layout: bool) -> dict:
    """Collective. Loads the model and optimizer state into this rank's fragments (any layout)
    and, when the layout is the one the checkpoint was written with, this rank's RNG states.
    Returns the trainer state recorded in the marker. A checkpoint that cannot be read is
    refused on every rank alike (not only on the one that reads the damaged part)."""
    marker = ref.marker()
    trainer_state = marker.get("trainer")
    if trainer_state is None:
        raise CheckpointError(f"{ref.path} was written by an older version of the project (no "
                              "trainer state in COMPLETE.json); start a new run directory")
    try:
        saved = SavedState(ref.path)
        problem = None
    except (OSError, ValueError) as err:
        problem = str(err)
    if _any_rank(problem is not None):
        raise CheckpointError(f"{ref.path} cannot be loaded ({problem or 'on another rank'}); "
                              "resume from another checkpoint (pass its directory to --resume)")
    load_into(owners, saved, engine.optimizer, trainer_state["adam_step"])
    if same_layout:
        rank_file = ref.path / f"trainer_rank{dist.get_rank():05d}.pt"
        if rank_file.is_file():
            set_rng_states(torch.load(rank_file, map_location="cpu", weights_only=False)["rng"])
    return trainer_state


def resume_differences(marker: dict, cfg) -> list[str]:
    """What differs between a checkpoint (its COMPLETE.json) and the run about to resume from it,
    in ways a resume cannot bridge (the model, the MTP objective, the data order); empty when it
    can resume. The parallel layout is not among them: the state resumes onto any layout."""
    from model.config import ModelConfig

    now, saved = cfg.to_dict(), marker["config"]
    diffs = []
    for section in ("model", "mtp"):
        for key, value in now[section].items():
            if section == "model" and key in ModelConfig.EXECUTION_FIELDS:
                continue  # how the model runs, not what it is
            old = saved[section].get(key)
            if old != value:
                diffs.append(f"{section}.{key}: checkpoint {old!r}, now {value!r}")
    for key in ("global_batch_size", "seed"):
        old = saved["train"][key]
        if old != now["train"][key]:
            diffs.append(f"train.{key}: checkpoint {old}, now {now['train'][key]}")
    return diffs


def layout_of(marker: dict) -> dict:
    """The parallel layout a checkpoint was written with."""
    lay = marker["layout"]
    return {"tp": lay["tp"], "pp": lay["pp"], "dp": lay["dp"],
            "zero": lay.get("zero", marker["config"]["parallel"]["zero_stage"])}
