"""Deterministic sample order of one epoch, and each data-parallel rank's slice of it.

Everything here is a pure function of (shard sample counts, seed, epoch, dp_rank, dp_size): no
process ids, no clocks, no worker count. That is what makes the loader's resume exact.

Order of epoch e (when shuffling), with rng = numpy Generator(SeedSequence([seed, e])):
1. the shards are permuted; "base order" = their samples concatenated, each shard in stored order
   (the order in which a tar stream delivers them);
2. base order is cut into consecutive blocks of `shuffle_buffer` samples and each block is
   permuted. This is a sample-buffer shuffle whose reads stay sequential: emitting any sample
   of block c needs only block c read, so a reader holds at most one block in memory.
The epoch order is then cut into dp_size contiguous slices, one per rank (see `rank_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))


@dataclass(frozen=True)
class EpochOrder:
    """Output position p of the epoch -> base position `order[p]`; base -> shard via `perm`."""

    perm: np.ndarray  # [S] shard indices (into the loader's shard list) in read order
    base_starts: np.ndarray  # [S+1] first base position of each permuted shard, then N
    order: np.ndarray  # [N] base position of each output position

    def locate(self, base_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into the loader's list, index within that shard) of base positions."""
        k = np.searchsorted(self.base_starts, base_pos, side="right") - 1
        return self.perm[k], base_pos - self.base_starts[k]


def make_epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle: bool,
                     shuffle_buffer: int) -> EpochOrder:
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    n = int(sizes.sum())
    if not shuffle:
        perm = np.arange(len(sizes))
        order = np.arange(n, dtype=np.int64)
    else:
        rng = epoch_rng(seed, epoch)
        perm = rng.permutation(len(sizes))
        keys = rng.random(n)
        block = np.arange(n, dtype=np.int64) // shuffle_buffer
        # lexsort: primary key = block, secondary = random key -> a permutation within each block
        order = np.lexsort((keys, block)).astype(np.int64)
    base_starts = np.concatenate([[0], np.cumsum(sizes[perm])]).astype(np.int64)
    return EpochOrder(perm=perm, base_starts=base_starts, order=order)


def rank_slice(num_samples: int, dp_rank: int, dp_size: int, one_pass: bool) -> tuple[int, int]:
    """[start, stop) of `dp_rank`'s contiguous slice of the epoch order.

    Training (one_pass=False): every rank gets exactly N // dp_size samples per epoch, so ranks
    stay in step across epochs; the last N % dp_size positions of each epoch's order (different
    samples every epoch) are left out. One pass (validation): the slices cover all N samples,
    the first N % dp_size ranks get one sample more.
    """
    base, rem = divmod(num_samples, dp_size)
    if not one_pass:
        return dp_rank * base, (dp_rank + 1) * base
    start = dp_rank * base + min(dp_rank, rem)
    return start, start + base + (1 if dp_rank < rem else 0)
