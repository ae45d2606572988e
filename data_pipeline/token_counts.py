"""How often each token id occurs in a prepared dataset: the ranking a reduced draft vocabulary
is chosen from (model/generation/draft_vocab.py)."""

from __future__ import annotations

import numpy as np

from data_pipeline.manifest import Manifest
from data_pipeline.shard_reader import stream_shard


def count_tokens(manifest: Manifest, max_tokens: int, split: str = "train") -> np.ndarray:
    """Occurrences [vocab_size] (int64) of each token id in the first windows of `split`, shards
    in stored order, until at least `max_tokens` tokens are counted (fewer if the split is
    smaller). A window's first `stride` tokens are counted: consecutive windows overlap by the
    MTP depth's extra labels, which would otherwise count twice."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens = {max_tokens} must be >= 1")
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    stride = int(manifest.data["stride"])
    seen = 0
    for shard in manifest.shards(split):
        wanted = set(range(shard.first_index, shard.first_index + shard.num_samples))
        for _, window in stream_shard(shard, wanted, manifest.dtype, manifest.window_len,
                                      manifest.vocab_size):
            counts += np.bincount(window[:stride], minlength=manifest.vocab_size)
            seen += stride
            if seen >= max_tokens:
                return counts
    return counts
