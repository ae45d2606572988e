"""Deterministic sample order of one epoch of one source.

Everything here is a pure function of (shard sample counts, seed, source index, epoch): no
process ids, no clocks, no worker count, no data-parallel layout. That is what makes the
loader's resume exact (data_pipeline/rank_split.py says which rank reads which positions).

Order of epoch e of source s (when shuffling), with rng = numpy Generator(SeedSequence([seed,
s, e])):
1. the shards are permuted; "base order" = their samples concatenated, each shard in stored order
   (the order in which a tar stream delivers them);
2. base order is cut into consecutive blocks of `shuffle_buffer` samples and each block is
   permuted. This is a sample-buffer shuffle whose reads stay sequential: emitting any sample
   of block c needs only block c read, so a reader holds at most one block in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_rng(seed: int, source: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, source, epoch])))


@dataclass(frozen=True)
class EpochOrder:
    """Output position p of the epoch -> base position `order[p]`; base -> shard via `perm`."""

    perm: np.ndarray  # [S] shard indices (into the loader's shard list) in read order
    base_starts: np.ndarray  # [S+1] first base position of each permuted shard, then N
    order: np.ndarray  # [N] base position of each output position

    def inverse(self) -> np.ndarray:
        """[N] output position of each base position."""
        inv = np.empty_like(self.order)
        inv[self.order] = np.arange(len(self.order), dtype=np.int64)
        return inv

    def locate(self, base_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into the loader's list, index within that shard) of base positions."""
        k = np.searchsorted(self.base_starts, base_pos, side="right") - 1
        return self.perm[k], base_pos - self.base_starts[k]


def make_epoch_order(shard_sizes: list[int], seed: int, source: int, epoch: int, shuffle: bool,
                     shuffle_buffer: int) -> EpochOrder:
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    n = int(sizes.sum())
    if not shuffle:
        perm = np.arange(len(sizes))
        order = np.arange(n, dtype=np.int64)
    else:
        rng = epoch_rng(seed, source, epoch)
        perm = rng.permutation(len(sizes))
        keys = rng.random(n)
        block = np.arange(n, dtype=np.int64) // shuffle_buffer
        # lexsort: primary key = block, secondary = random key -> a permutation within each block
        order = np.lexsort((keys, block)).astype(np.int64)
    base_starts = np.concatenate([[0], np.cumsum(sizes[perm])]).astype(np.int64)
    return EpochOrder(perm=perm, base_starts=base_starts, order=order)
