"""The one place that turns a run's data config into loaders: training batches, validation
batches and held-out prompts, for the trainer and for `mtp eval` alike."""

from __future__ import annotations

from typing import Literal

from data_pipeline import ShardLoader
from pretrain.config import DataConfig

Purpose = Literal["train", "validation", "prompts"]


def make_loader(data: DataConfig, purpose: Purpose, *, dp_rank: int, dp_size: int,
                batch_size: int, seed: int, depth: int, pin_memory: bool = False,
                split: str | None = None, shuffle: bool = True,
                global_batch_size: int | None = None) -> ShardLoader:
    """`train`: this data-parallel rank's endless, resumable stream of training batches; each
    optimizer step consumes the next `global_batch_size` samples of the global order.
    `validation`: one pass over the split (default 'val') with the MTP labels of `depth`.
    `prompts`: one pass over the split's windows as plain token rows (no MTP labels), for
    decoding from held-out prompts."""
    common = dict(dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size, seed=seed,
                  shuffle=shuffle, shuffle_buffer=data.shuffle_buffer)
    if purpose == "train":
        return ShardLoader(
            data.path, split or "train", num_workers=data.num_workers, depth=depth,
            mask_cross_document=data.mask_cross_document, skip_corrupt=data.skip_corrupt,
            verify_checksums=data.verify_checksums, pin_memory=pin_memory,
            global_batch_size=global_batch_size, **common)
    return ShardLoader(
        data.path, split or "val", num_workers=0, infinite=False, pin_memory=pin_memory,
        depth=depth if purpose == "validation" else 0,
        mask_cross_document=data.mask_cross_document and purpose == "validation",
        skip_corrupt=data.skip_corrupt, **common)
