"""Which positions of the global sample order a data-parallel rank consumes, batch by batch.

Training (`StepSplit`): optimizer step k consumes the window [start + k·G, start + (k+1)·G) of
the global order (G = global batch size, in samples). The window is cut into dp_size contiguous
shares of G / dp_size; rank r takes share r and walks it in micro-batches of B (its gradient
accumulation is G / (dp_size · B)). So the set of samples of every optimizer step, and the
position after it, depend on G alone, not on how the step is spread over ranks: a resume with
another data-parallel size (or micro-batch size) continues at the next unconsumed sample. Within
a step, a single process reading the window in micro-batches sees rank 0's micro-batches, then
rank 1's, ... (the order in which a reference run without data parallelism sums them).

One pass (`PassSplit`, validation): rank r reads the r-th contiguous slice of the N samples
(the first N % dp_size ranks one more), in batches of B, the last one possibly short.

Both are pure functions of their fields; `batch_of` is the vectorised inverse of `batch_range`,
used by the DataLoader workers to know which samples of a shard they will need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepSplit:
    dp_rank: int
    dp_size: int
    batch_size: int
    global_batch: int
    start: int
    """Global position of the first window (a step boundary)."""
    first_batch: int = 0
    """Micro-batches of the first window this rank had already consumed (resume mid-step)."""

    def __post_init__(self) -> None:
        assert 0 <= self.dp_rank < self.dp_size
        assert self.global_batch % (self.dp_size * self.batch_size) == 0
        assert 0 <= self.first_batch < self.accumulation

    @property
    def share(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def accumulation(self) -> int:
        return self.share // self.batch_size

    def batch_range(self, i: int) -> tuple[int, int] | None:
        """[a, b) global positions of this rank's micro-batch i (counted from the first window)."""
        k, m = divmod(i, self.accumulation)
        a = self.start + k * self.global_batch + self.dp_rank * self.share + m * self.batch_size
        return a, a + self.batch_size

    def batch_of(self, p: np.ndarray) -> np.ndarray:
        """This rank's micro-batch index of each global position, or -1 if not this rank's."""
        d = np.asarray(p, dtype=np.int64) - self.start
        k, off = np.divmod(d, self.global_batch)
        rank, rem = np.divmod(off, self.share)
        i = k * self.accumulation + rem // self.batch_size
        return np.where((d >= 0) & (rank == self.dp_rank) & (i >= self.first_batch), i, -1)


@dataclass(frozen=True)
class PassSplit:
    dp_rank: int
    dp_size: int
    batch_size: int
    total: int
    """Samples in the pass (one epoch of the source)."""
    first_batch: int = 0

    @property
    def bounds(self) -> tuple[int, int]:
        base, rem = divmod(self.total, self.dp_size)
        start = self.dp_rank * base + min(self.dp_rank, rem)
        return start, start + base + (1 if self.dp_rank < rem else 0)

    def batch_range(self, i: int) -> tuple[int, int] | None:
        start, stop = self.bounds
        a = start + i * self.batch_size
        return None if a >= stop else (a, min(a + self.batch_size, stop))

    def batch_of(self, p: np.ndarray) -> np.ndarray:
        start, stop = self.bounds
        p = np.asarray(p, dtype=np.int64)
        i = (p - start) // self.batch_size
        return np.where((p >= start) & (p < stop) & (i >= self.first_batch), i, -1)
