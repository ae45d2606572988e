"""`ShardLoader`: streaming MTP batches from the shards of one or more sources, split by DP rank
and DataLoader worker, with a resume position that does not depend on the parallel layout.

How samples are assigned (all deterministic):
* Each source has, per epoch, one seeded order of its samples (`epoch_order`); its stream is
  its epochs concatenated (a source that runs out starts its next epoch on its own).
* The sources are interleaved by weight, sample by sample, into one infinite global order
  (`mixture.SampleMix`; one source: its stream).
* Training: optimizer step k consumes the window [k·G, (k+1)·G) of the global order (G = the
  global batch size); rank r takes the r-th contiguous share of the window and walks it in
  micro-batches (`rank_split.StepSplit`). One pass (validation, one source): rank r reads the
  r-th contiguous slice of epoch 0 (`rank_split.PassSplit`).
* DataLoader worker w builds the rank's batches i = w, w+W, ...; the DataLoader returns worker
  outputs round-robin in order, so the rank sees batches 0, 1, 2, ... exactly as with
  num_workers=0. A worker reads each shard of an epoch once, in the epoch's read order, keeping
  only the samples its batches need (at most a shuffle block plus a shard of them at a time).

Hence the state is the global position (samples consumed by all ranks together, a multiple of
G at a step boundary) and the per-source positions follow from it: a resume continues at the
next unconsumed sample with any data-parallel size, micro-batch size or worker count, none
repeated, none skipped (docs/DESIGN.md, Data).

The cost of that: a rank's share of a window is spread over the shuffle block that the window
comes from, so every data-reading rank streams every shard of the blocks it reads from and
keeps 1/dp of the samples: a rank reads dp times the bytes it uses (the reads stay sequential;
the shard reader seeks past the others' members, so the cost in tokens delivered is much less
than dp: rank 0 of DP=4 delivered 4.1-6.5 M tokens/s over loopback HTTP against 5.2-9.1 M at
DP=1, benchmarks/RESULTS.md).
Contiguous per-rank slices of each epoch read only a rank's own bytes but make the set of
consumed samples depend on dp, so no other dp could resume from them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .epoch_order import make_epoch_order
from .labels import _labels_numpy
from .manifest import Manifest, ShardError, ShardInfo, load_manifest
from .mixture import DataSource, SampleMix, as_sources, check_same_tokenizer
from .rank_split import PassSplit, StepSplit
from .remote import RemoteOptions
from .shard_reader import stream_shard

STATE_VERSION = 2


@dataclass(frozen=True)
class _SourcePlan:
    index: int
    name: str
    shards: tuple[ShardInfo, ...]
    dtype: np.dtype
    window_len: int
    vocab_size: int

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs (picklable, fixed for one iteration)."""

    sources: tuple[_SourcePlan, ...]
    weights: tuple[int, ...]
    split: StepSplit | PassSplit
    seq_len: int
    depth: int
    eos_id: int
    mask_cross_document: bool
    skip_corrupt: bool
    seed: int
    shuffle: bool
    shuffle_buffer: int
    remote: RemoteOptions


class _SourceCursor:
    """One source's samples for one worker: the shards of the current epoch read once, in the
    epoch's read order, keeping the samples that `owned` says this worker's batches need."""

    def __init__(self, plan: _Plan, src: _SourcePlan, mix: SampleMix, owned, bad: dict,
                 events: list):
        self.plan, self.src, self.mix, self.owned = plan, src, mix, owned
        self.bad, self.events = bad, events
        self.epoch = -1
        self.reader = None
        self.pending: dict[int, np.ndarray | None] = {}

    def get(self, j: int) -> np.ndarray | None:
        """The window at position j of the source's stream (None: lost to a skipped shard)."""
        epoch = j // self.src.num_samples
        if epoch != self.epoch:
            assert not self.pending, "samples of the previous epoch were left unread"
            self.epoch, self.reader = epoch, self._read_epoch(epoch)
        while j not in self.pending:
            got = next(self.reader, None)
            assert got is not None, f"source {self.src.name}: sample {j} was never scheduled"
            self.pending[got[0]] = got[1]
        return self.pending.pop(j)

    def _read_epoch(self, epoch: int):
        plan, src = self.plan, self.src
        n = src.num_samples
        order = make_epoch_order([s.num_samples for s in src.shards], plan.seed, src.index, epoch,
                                 plan.shuffle, plan.shuffle_buffer)
        out_pos = order.inverse()  # [N] output position of each base (stored) position
        for k, shard_idx in enumerate(order.perm):
            b0, b1 = int(order.base_starts[k]), int(order.base_starts[k + 1])
            j = epoch * n + out_pos[b0:b1]  # [shard samples] stream position of each
            mine = np.flatnonzero(self.owned(self.mix.positions(src.index, j)))
            if mine.size == 0:
                continue
            shard = src.shards[int(shard_idx)]
            wanted = {shard.first_index + int(i): int(j[i]) for i in mine}
            if shard.label not in self.bad:
                try:
                    for gid, window in stream_shard(shard, set(wanted), src.dtype, src.window_len,
                                                    src.vocab_size, plan.remote, self._retried):
                        yield wanted.pop(gid), window
                except ShardError as err:
                    if not plan.skip_corrupt:
                        raise
                    self.bad[shard.label] = err.problem
                    self.events.append(("skipped_shard", shard.label, err.problem))
            for gid in sorted(wanted):  # lost to a corrupt shard (skip_corrupt=True)
                self.events.append(("lost_sample", shard.label, gid))
                yield wanted[gid], None

    def _retried(self, url: str, detail: str) -> None:
        self.events.append(("retry", url, detail))


class _RankStream(IterableDataset):
    """The rank's batches (as `plan.split` assigns them), split over DataLoader workers."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

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
        plan, split = self.plan, self.plan.split
        mix = SampleMix(list(plan.weights))

        def owned(p: np.ndarray) -> np.ndarray:
            i = split.batch_of(p)
            return (i >= 0) & ((i - split.first_batch) % nw == w)

        bad: dict[str, str] = {}
        events: list = []
        cursors = [_SourceCursor(plan, s, mix, owned, bad, events) for s in plan.sources]
        i = split.first_batch + w
        while (span := split.batch_range(i)) is not None:
            sources, positions = mix.locate(*span)
            windows = [cursors[s].get(int(j)) for s, j in zip(sources, positions)]
            windows = [x for x in windows if x is not None]
            yield self._collate(windows), span[1] - span[0], events[:]
            events.clear()
            i += nw

    def _collate(self, windows: list[np.ndarray]) -> np.ndarray | None:
        # Workers hand over the compact stored dtype (2 bytes/token, one pickled array);
        # the int64 labels and float mask are 16x larger and are built in the main process.
        if not windows:
            return None
        used = self.plan.seq_len + self.plan.depth + 1  # sources may store longer windows
        return np.stack([x[:used] for x in windows])  # [B, T+D+1]


def _identity(x):
    return x


class ShardLoader:
    """Iterable of MTP batches for one data-parallel rank (see the module docstring for the order).

    Batches are dicts: `input_ids` [B,T] int64, `labels` [B,D+1,T] int64 with
    labels[:, j, i] = w[i+1+j], and `loss_mask` [B,D+1,T] float32 (1.0 = train on this target,
    0.0 = ignore; see `make_mtp_labels` for the cross-document rule).

    Args:
        data: `manifest.json` or the dataset directory (or its http(s)://, s3:// or pipe:
            location), or a list of `DataSource`s to interleave by weight (training only; they
            must share the tokenizer).
        split: "train" or "val".
        dp_rank, dp_size: data-parallel coordinates; TP/PP peers pass the same dp_rank.
        num_workers: DataLoader worker processes (0 = read in the calling process).
        batch_size: micro-batch size B (the last batch of a one-pass iteration may be smaller).
        global_batch_size: samples per optimizer step over all DP ranks (G, a multiple of
            B · dp_size); default B · dp_size. Training only.
        seed: shuffle seed; epoch e of source s uses (seed, s, e).
        depth: MTP depth D (<= every source's max_depth).
        mask_cross_document: mask targets separated from their input by an EOS.
        skip_corrupt: skip shards that are missing, of the wrong size or unreadable, counting
            them (`corrupt_shards`, `num_skipped_samples`) instead of raising ShardError.
        infinite: iterate epochs forever (default for "train") or one pass (default for "val").
            A one-pass iteration that completes resets the position, so the next `iter()` is a
            new pass.
        shuffle: shuffle shards and samples (default True; False reads in stored order).
        shuffle_buffer: samples per shuffle block (also the most samples a worker buffers).
        verify_checksums: check the split's local shard sha256s against the manifest up front
            (reads every shard once); mismatches raise ShardError, or are skipped with
            skip_corrupt. Remote shards are always verified as they stream.
        remote: retries, backoff, cache directory and s3 command for remote sources.
    """

    def __init__(self, data: str | os.PathLike | Sequence[DataSource], split: str, *,
                 dp_rank: int, dp_size: int, num_workers: int, batch_size: int, seed: int,
                 depth: int, global_batch_size: int | None = None,
                 mask_cross_document: bool = False, skip_corrupt: bool = False,
                 infinite: bool | None = None, shuffle: bool = True, shuffle_buffer: int = 8192,
                 pin_memory: bool = False, prefetch_factor: int = 4,
                 verify_checksums: bool = False, remote: RemoteOptions | None = None):
        global_batch_size = global_batch_size or batch_size * dp_size
        for name, value, low in (("dp_size", dp_size, 1), ("dp_rank", dp_rank, 0),
                                 ("num_workers", num_workers, 0), ("batch_size", batch_size, 1),
                                 ("global_batch_size", global_batch_size, 1),
                                 ("seed", seed, 0), ("depth", depth, 0),
                                 ("shuffle_buffer", shuffle_buffer, 1),
                                 ("prefetch_factor", prefetch_factor, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ShardLoader.{name} = {value!r} is invalid; use an integer >= "
                                 f"{low}")
        if dp_rank >= dp_size:
            raise ValueError(f"ShardLoader.dp_rank = {dp_rank} is invalid; it must be < "
                             f"dp_size = {dp_size}")
        if global_batch_size % (batch_size * dp_size):
            raise ValueError(f"ShardLoader.global_batch_size = {global_batch_size} is not a "
                             f"multiple of batch_size × dp_size = {batch_size} × {dp_size}")
        self.sources = as_sources(data)
        self.one_pass = (split != "train") if infinite is None else not infinite
        if self.one_pass and len(self.sources) > 1:
            raise ValueError("a one-pass (validation) loader reads one source; make one loader "
                             "per source")
        self.remote = remote or RemoteOptions()
        self.manifests: list[Manifest] = [load_manifest(s.path, check_files=False,
                                                        remote=self.remote) for s in self.sources]
        check_same_tokenizer([(s.label, m) for s, m in zip(self.sources, self.manifests)])
        for s, m in zip(self.sources, self.manifests):
            if depth > m.max_depth:
                raise ValueError(f"ShardLoader depth={depth} exceeds the dataset's max_depth="
                                 f"{m.max_depth} (data source {s.label!r}; windows hold seq_len "
                                 f"+ max_depth + 1 tokens); rebuild it with `mtp prepare "
                                 f"--max-depth {depth}` or lower the depth")
        self.split = split
        self.corrupt_shards: dict[str, str] = {}
        self.num_skipped_samples = 0
        plans = [self._source_plan(i, s, m, verify_checksums, skip_corrupt)
                 for i, (s, m) in enumerate(zip(self.sources, self.manifests))]
        self._excluded = sorted(self.corrupt_shards)
        self.mix = SampleMix([s.weight for s in self.sources])
        if self.one_pass and plans[0].num_samples < dp_size:
            raise ValueError(f"the {split} split has {plans[0].num_samples} usable samples, fewer "
                             f"than dp_size={dp_size}; build more data or lower the "
                             "data-parallel size")
        m0 = self.manifests[0]
        self._plan = _Plan(sources=tuple(plans), weights=tuple(self.mix.weights), split=None,
                           seq_len=m0.seq_len, depth=depth, eos_id=m0.eos_id,
                           mask_cross_document=mask_cross_document, skip_corrupt=skip_corrupt,
                           seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                           remote=self.remote)
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.batch_size, self.global_batch_size = batch_size, global_batch_size
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.retries: list[str] = []
        """One line per transient remote failure that was retried (the trainer logs them)."""
        self._position = 0  # global samples consumed up to the current step's window
        self._in_step = 0  # this rank's micro-batches consumed of that window

    def _source_plan(self, index: int, source: DataSource, m: Manifest, verify: bool,
                     skip_corrupt: bool) -> _SourcePlan:
        label = (lambda name: name) if len(self.sources) == 1 else \
            (lambda name: f"{source.label}/{name}")
        shards = [ShardInfo(**{**s.__dict__, "label": label(s.name)}) for s in m.shards(self.split)]
        bad = {}
        for err in m.verify(self.split) if verify else m.check_shard_sizes(self.split):
            if not skip_corrupt:
                raise ShardError(label(err.shard), err.problem)
            bad[label(err.shard)] = err.problem
        self.corrupt_shards.update(bad)
        kept = tuple(s for s in shards if s.label not in bad)
        self.num_skipped_samples += sum(s.num_samples for s in shards) - sum(
            s.num_samples for s in kept)
        if not kept or sum(s.num_samples for s in kept) == 0:
            raise ValueError(f"data source {source.label!r} has no usable samples in its "
                             f"{self.split} split")
        return _SourcePlan(index=index, name=source.label, shards=kept, dtype=m.dtype,
                           window_len=m.window_len, vocab_size=m.vocab_size)

    # ------------------------------------------------------------------ positions
    def _split(self) -> StepSplit | PassSplit:
        if self.one_pass:
            return PassSplit(self.dp_rank, self.dp_size, self.batch_size,
                             self._plan.sources[0].num_samples,
                             first_batch=self._position // self.batch_size)
        return StepSplit(self.dp_rank, self.dp_size, self.batch_size, self.global_batch_size,
                         start=self._position, first_batch=self._in_step)

    @property
    def accumulation(self) -> int:
        """Micro-batches of this rank per optimizer step (training)."""
        return self.global_batch_size // (self.dp_size * self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """One pass: samples this rank reads in the pass. Training: samples in one epoch of
        every source together."""
        if self.one_pass:
            start, stop = self._split().bounds
            return stop - start
        return sum(s.num_samples for s in self._plan.sources)

    @property
    def batches_per_epoch(self) -> int:
        """One pass: batches of one pass (last may be short)."""
        return -(-self.samples_per_epoch // self.batch_size)

    def consumed_per_source(self) -> dict[str, int]:
        """Training samples of each source consumed by all ranks together, up to the current
        step's window (a global count: the same on every rank)."""
        return {s.name: c for s, c in zip(self._plan.sources, self.mix.counts_at(self._position))}

    @property
    def epochs(self) -> dict[str, int]:
        """Completed epochs of each source."""
        return {s.name: c // s.num_samples
                for s, c in zip(self._plan.sources, self.mix.counts_at(self._position))}

    @property
    def epoch(self) -> int:
        """Epochs completed by every source."""
        return min(self.epochs.values())

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        plan = self._plan
        plan = _Plan(**{**plan.__dict__, "split": self._split()})
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor}
        loader = DataLoader(_RankStream(plan), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, **kw)
        for batch, advanced, events in loader:
            for kind, shard, detail in events:
                if kind == "error":
                    raise ShardError(shard, detail)
                if kind == "skipped_shard":
                    self.corrupt_shards.setdefault(shard, detail)
                elif kind == "lost_sample":
                    self.num_skipped_samples += 1
                elif kind == "retry":
                    self.retries.append(f"{shard}: {detail}")
            self._advance(advanced)
            if batch is not None:
                # batch: [B, T+D+1] in the stored dtype; numpy labels (see make_mtp_labels)
                arrays = _labels_numpy(batch, plan.seq_len, plan.depth, plan.eos_id,
                                       plan.mask_cross_document)
                batch = {k: torch.from_numpy(a) for k, a in
                         zip(("input_ids", "labels", "loss_mask"), arrays, strict=True)}
                if self.pin_memory:  # page-locked host memory for async host-to-device copies
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                yield batch
        if self.one_pass:
            self._position = 0  # the pass is complete: the next iter() is a new pass

    def _advance(self, samples: int) -> None:
        if self.one_pass:
            self._position += samples  # of this rank's pass
            return
        self._in_step += 1
        if self._in_step == self.accumulation:
            self._position += self.global_batch_size
            self._in_step = 0

    def verify(self) -> list[ShardError]:
        """sha256 + size of this split's (local) shards against the manifests."""
        return [e for m in self.manifests for e in m.verify(self.split)]

    # ------------------------------------------------------------------ state
    def _identity_state(self) -> dict:
        p = self._plan
        ident = {"split": self.split, "seed": p.seed, "shuffle": p.shuffle,
                 "shuffle_buffer": p.shuffle_buffer, "one_pass": self.one_pass,
                 # The datasets by content, not by name or location: a source may move (local ->
                 # http) or be renamed between runs without changing the order.
                 "source_fingerprints": [m.fingerprint for m in self.manifests],
                 "weights": list(self.mix.weights), "excluded_shards": list(self._excluded)}
        if self.one_pass:  # a pass is this rank's slice: only the same layout can continue it
            ident.update(dp_rank=self.dp_rank, dp_size=self.dp_size, batch_size=self.batch_size)
        return ident

    def state_dict(self) -> dict:
        """Position after the last batch handed out: resume continues right after it.

        Training: `samples_consumed` is the global position (all ranks together) and
        `consumed_per_source` what it means per source; both are layout-free. Only a state
        saved in the middle of an optimizer step (`step_in_progress`) ties the resume to the
        same layout."""
        state = {"version": STATE_VERSION, **self._identity_state(),
                 "sources": [s.label for s in self.sources], "samples_consumed": self._position}
        if self.one_pass:
            return state
        seq = self._plan.seq_len
        state["consumed_per_source"] = {
            s.name: {"samples": c, "tokens": c * seq, "epoch": c // s.num_samples}
            for s, c in zip(self._plan.sources, self.mix.counts_at(self._position))}
        state["step_in_progress"] = None if self._in_step == 0 else self._layout_state()
        return state

    def _layout_state(self) -> dict:
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "batch_size": self.batch_size,
                "global_batch_size": self.global_batch_size, "micro_batches": self._in_step}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` with any DP size, micro-batch size or worker count (the
        order, i.e. seed, sources, weights, shuffle and datasets, may not change)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was written by another version of the loader")
        for key, value in self._identity_state().items():
            if state.get(key) != value:
                raise ValueError(f"cannot resume: loader state has {key}={state.get(key)!r} but "
                                 f"this loader has {key}={value!r}; the sample order would differ")
        position = int(state["samples_consumed"])
        if position < 0 or (self.one_pass and position > self.samples_per_epoch):
            raise ValueError(f"loader state samples_consumed={position} is out of range")
        in_step = 0
        if not self.one_pass and state.get("step_in_progress"):
            saved = dict(state["step_in_progress"])
            in_step = saved.pop("micro_batches")
            now = {k: v for k, v in self._layout_state().items() if k != "micro_batches"}
            if saved != now:
                raise ValueError(
                    f"cannot resume: the loader state was saved after {in_step} micro-batch(es) "
                    f"of an optimizer step with {saved}, which this loader ({now}) cannot "
                    "continue; resume from a state saved at a step boundary")
        self._position, self._in_step = position, in_step
