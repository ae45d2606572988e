"""`ShardLoader`: streaming MTP batches from the shards, split by DP rank and worker, exact resume.

How samples are assigned (all deterministic, see `epoch_order`):
* Each epoch has one global order of the split's samples (a function of seed and epoch only).
  Rank r reads the r-th contiguous slice of it, the same for every TP/PP peer passing the same
  dp_rank. This is a split at the sample level, so it works for any number of shards (even one
  shard for many ranks), and a contiguous slice touches only ~1/dp_size of the shards.
* The rank's stream is the concatenation of its slices over epochs 0, 1, 2, ... (training), or
  its slice of epoch 0 (one pass). Batch i (counted from the resume point) is stream positions
  [q0 + i*B, q0 + (i+1)*B). DataLoader worker w builds batches i = w, w+W, w+2W, ...; the
  DataLoader returns worker outputs round-robin in order, so the rank sees batches 0, 1, 2, ...
  exactly as with num_workers=0. Each worker only reads the shards holding its samples.
* Hence the state is one number, the stream position (samples consumed by the caller), and a
  resume reproduces the uninterrupted stream exactly, even with another num_workers or
  micro-batch size. Training batches may straddle an epoch boundary (no sample is dropped
  besides the per-epoch remainder of N % dp_size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .epoch_order import EpochOrder, make_epoch_order, rank_slice
from .labels import _labels_numpy
from .manifest import ShardError, ShardInfo, load_manifest
from .shard_reader import stream_shard

STATE_VERSION = 1


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs (picklable, fixed for the loader's life)."""

    shards: tuple[ShardInfo, ...]
    dtype: np.dtype
    window_len: int
    seq_len: int
    depth: int
    eos_id: int
    vocab_size: int
    mask_cross_document: bool
    skip_corrupt: bool
    seed: int
    shuffle: bool
    shuffle_buffer: int
    batch_size: int
    one_pass: bool
    rank_start: int
    rank_len: int  # samples of this rank per epoch


class _EpochView:
    """This rank's slice of one epoch: sample id of each position, and a lazy reader."""

    def __init__(self, plan: _Plan, epoch: int):
        self.plan = plan
        self.order: EpochOrder = make_epoch_order([s.num_samples for s in plan.shards], plan.seed,
                                                  epoch, plan.shuffle, plan.shuffle_buffer)
        self.base = self.order.order[plan.rank_start:plan.rank_start + plan.rank_len]  # [n]
        shard_idx, local = self.order.locate(self.base)
        firsts = np.array([s.first_index for s in plan.shards], dtype=np.int64)
        self.gids = firsts[shard_idx] + local  # [n] sample index at each position of the slice

    def reader(self, positions: np.ndarray, bad: dict[str, str], events: list):
        """Yield (gid, window or None) for the slice positions given, in read (base) order."""
        plan = self.plan
        by_base = positions[np.argsort(self.base[positions])]  # read order = stored order
        shard_idx, _ = self.order.locate(self.base[by_base])
        gids = self.gids[by_base]
        cuts = np.flatnonzero(np.diff(shard_idx)) + 1
        for idx_run, gid_run in zip(np.split(shard_idx, cuts), np.split(gids, cuts)):
            shard = plan.shards[int(idx_run[0])]
            wanted = {int(g) for g in gid_run}
            if shard.name not in bad:
                try:
                    for gid, window in stream_shard(shard, wanted, plan.dtype, plan.window_len,
                                                    plan.vocab_size):
                        wanted.discard(gid)
                        yield gid, window
                except ShardError as err:
                    if not plan.skip_corrupt:
                        raise
                    bad[shard.name] = err.problem
                    events.append(("skipped_shard", shard.name, err.problem))
            for gid in sorted(wanted):  # lost to a corrupt shard (skip_corrupt=True)
                events.append(("lost_sample", shard.name, gid))
                yield gid, None


class _RankStream(IterableDataset):
    """The rank's batches from stream position `start`, split over DataLoader workers."""

    def __init__(self, plan: _Plan, start: int):
        super().__init__()
        self.plan = plan
        self.start = start

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self._batches(w, nw)
        except ShardError as err:
            # Re-raised cleanly by the main process (a worker exception would arrive wrapped
            # in a DataLoader traceback).
            yield None, 0, [("error", err.shard, err.problem)]

    def _batches(self, w: int, nw: int):
        plan, q0, bsz, n = self.plan, self.start, self.plan.batch_size, self.plan.rank_len
        bad: dict[str, str] = {}
        view, reader, epoch = None, None, -1
        pending: dict[int, np.ndarray | None] = {}
        events: list = []
        i = w
        while True:
            start, stop = q0 + i * bsz, q0 + (i + 1) * bsz
            if plan.one_pass:
                if start >= n:
                    return
                stop = min(stop, n)
            windows = []
            for q in range(start, stop):
                e, o = divmod(q, n)
                if e != epoch:
                    assert not pending, "samples of the previous epoch were left unread"
                    epoch, view = e, _EpochView(plan, e)
                    qs = np.arange(max(q0, e * n), (e + 1) * n)
                    mine = qs[((qs - q0) // bsz) % nw == w] - e * n  # this worker's positions
                    reader = view.reader(mine, bad, events)
                gid = int(view.gids[o])
                while gid not in pending:
                    got_gid, window = next(reader)
                    pending[got_gid] = window
                window = pending.pop(gid)
                if window is not None:
                    windows.append(window)
            yield self._collate(windows), stop - start, events[:]
            events.clear()
            i += nw

    def _collate(self, windows: list[np.ndarray]) -> np.ndarray | None:
        # Workers hand over the compact stored dtype (2 bytes/token, one pickled array);
        # the int64 labels and float mask are 16x larger and are built in the main process.
        if not windows:
            return None
        used = self.plan.seq_len + self.plan.depth + 1
        return np.stack(windows)[:, :used]  # [B, T+D+1]


def _identity(x):
    return x


class ShardLoader:
    """Iterable of MTP batches for one data-parallel rank (see the module docstring for the order).

    Batches are dicts: `input_ids` [B,T] int64, `labels` [B,D+1,T] int64 with
    labels[:, j, i] = w[i+1+j], and `loss_mask` [B,D+1,T] float32 (1.0 = train on this target,
    0.0 = ignore; see `make_mtp_labels` for the cross-document rule).

    Args:
        manifest_path: `manifest.json` or the dataset directory.
        split: "train" or "val".
        dp_rank, dp_size: data-parallel coordinates; TP/PP peers pass the same dp_rank.
        num_workers: DataLoader worker processes (0 = read in the calling process).
        batch_size: micro-batch size B (the last batch of a one-pass iteration may be smaller).
        seed: shuffle seed; epoch e uses (seed, e).
        depth: MTP depth D (<= the manifest's max_depth).
        mask_cross_document: mask targets separated from their input by an EOS.
        skip_corrupt: skip shards that are missing, of the wrong size or unreadable, counting
            them (`corrupt_shards`, `num_skipped_samples`) instead of raising ShardError.
        infinite: iterate epochs forever (default for "train") or one pass (default for "val").
            A one-pass iteration that completes resets the position, so the next `iter()` is a
            new pass.
        shuffle: shuffle shards and samples (default True; False reads in stored order).
        shuffle_buffer: samples per shuffle block (also the most samples a worker buffers).
        verify_checksums: check the split's shard sha256s against the manifest up front (reads
            every shard once); mismatches raise ShardError, or are skipped with skip_corrupt.
    """

    def __init__(self, manifest_path: str | os.PathLike, split: str, *, dp_rank: int, dp_size: int,
                 num_workers: int, batch_size: int, seed: int, depth: int,
                 mask_cross_document: bool = False, skip_corrupt: bool = False,
                 infinite: bool | None = None, shuffle: bool = True, shuffle_buffer: int = 8192,
                 pin_memory: bool = False, prefetch_factor: int = 4,
                 verify_checksums: bool = False):
        for name, value, low in (("dp_size", dp_size, 1), ("dp_rank", dp_rank, 0),
                                 ("num_workers", num_workers, 0), ("batch_size", batch_size, 1),
                                 ("seed", seed, 0), ("depth", depth, 0),
                                 ("shuffle_buffer", shuffle_buffer, 1),
                                 ("prefetch_factor", prefetch_factor, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ShardLoader.{name} = {value!r} is invalid; use an integer >= "
                                 f"{low}")
        if dp_rank >= dp_size:
            raise ValueError(f"ShardLoader.dp_rank = {dp_rank} is invalid; it must be < "
                             f"dp_size = {dp_size}")
        self.manifest = load_manifest(manifest_path, check_files=False)
        m = self.manifest
        if depth > m.max_depth:
            raise ValueError(f"ShardLoader depth={depth} exceeds the dataset's max_depth="
                             f"{m.max_depth} (windows hold seq_len + max_depth + 1 tokens); "
                             f"rebuild with `mtp prepare --max-depth {depth}` or lower the depth")
        self.split = split
        shards = m.shards(split)
        self.corrupt_shards: dict[str, str] = {}
        for err in m.verify(split) if verify_checksums else m.check_shard_sizes(split):
            if not skip_corrupt:
                raise err
            self.corrupt_shards[err.shard] = err.problem
        self._excluded = sorted(self.corrupt_shards)
        kept = tuple(s for s in shards if s.name not in self.corrupt_shards)
        total = sum(s.num_samples for s in kept)
        one_pass = (split != "train") if infinite is None else not infinite
        if total < dp_size:
            raise ValueError(f"the {split} split has {total} usable samples, fewer than dp_size="
                             f"{dp_size}; build more data or lower the data-parallel size")
        start, stop = rank_slice(total, dp_rank, dp_size, one_pass)
        self.num_skipped_samples = sum(s.num_samples for s in shards) - total
        self._plan = _Plan(shards=kept, dtype=m.dtype, window_len=m.window_len, seq_len=m.seq_len,
                           depth=depth, eos_id=m.eos_id, vocab_size=m.vocab_size,
                           mask_cross_document=mask_cross_document, skip_corrupt=skip_corrupt,
                           seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                           batch_size=batch_size, one_pass=one_pass, rank_start=start,
                           rank_len=stop - start)
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._consumed = 0

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch (per pass in one-pass mode)."""
        return self._plan.rank_len

    @property
    def batches_per_epoch(self) -> int:
        """One pass: batches of one pass (last may be short). Training: full epochs / B, floored."""
        p = self._plan
        return -(-p.rank_len // p.batch_size) if p.one_pass else p.rank_len // p.batch_size

    @property
    def epoch(self) -> int:
        return self._consumed // self._plan.rank_len

    def __iter__(self):
        plan = self._plan
        dataset = _RankStream(plan, self._consumed)
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor}
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, **kw)
        for batch, advanced, events in loader:
            for kind, shard, detail in events:
                if kind == "error":
                    raise ShardError(shard, detail)
                if kind == "skipped_shard":
                    self.corrupt_shards.setdefault(shard, detail)
                elif kind == "lost_sample":
                    self.num_skipped_samples += 1
            self._consumed += advanced
            if batch is not None:
                # batch: [B, T+D+1] in the stored dtype; numpy labels (see make_mtp_labels)
                arrays = _labels_numpy(batch, plan.seq_len, plan.depth, plan.eos_id,
                                       plan.mask_cross_document)
                batch = {k: torch.from_numpy(a) for k, a in
                         zip(("input_ids", "labels", "loss_mask"), arrays, strict=True)}
                if self.pin_memory:  # page-locked host memory for async host-to-device copies
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                yield batch
        if plan.one_pass and self._consumed >= plan.rank_len:
            self._consumed = 0  # the pass is complete: the next iter() is a new pass

    def verify(self) -> list[ShardError]:
        """sha256 + size of this split's shards against the manifest; returns the problems."""
        return self.manifest.verify(self.split)

    def _identity_state(self) -> dict:
        p = self._plan
        return {"split": self.split, "seed": p.seed, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "shuffle": p.shuffle, "shuffle_buffer": p.shuffle_buffer,
                "one_pass": p.one_pass, "manifest_fingerprint": self.manifest.fingerprint,
                "excluded_shards": list(self._excluded)}

    def state_dict(self) -> dict:
        """Position after the last batch handed out: resume continues right after it."""
        n = self._plan.rank_len
        return {"version": STATE_VERSION, **self._identity_state(), "samples_consumed": self._consumed,
                "epoch": self._consumed // n, "sample_in_epoch": self._consumed % n}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; num_workers and batch_size may differ, the order may not."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, value in self._identity_state().items():
            if state.get(key) != value:
                raise ValueError(f"cannot resume: loader state has {key}={state.get(key)!r} but "
                                 f"this loader has {key}={value!r}; the sample order would differ")
        consumed = int(state["samples_consumed"])
        if consumed < 0 or (self._plan.one_pass and consumed > self._plan.rank_len):
            raise ValueError(f"loader state samples_consumed={consumed} is out of range")
        self._consumed = consumed
