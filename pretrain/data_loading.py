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
                global_batch_size: int | None = None, source: str | None = None) -> ShardLoader:
    """`train`: this data-parallel rank's endless, resumable stream of training batches (of the
    mixture, when data.sources lists several); each optimizer step consumes the next
    `global_batch_size` samples of the global order.
    `validation`: one pass over the split (default 'val') of one source (`source`, a name;
    default the first) with the MTP labels of `depth`.
    `prompts`: one pass over the split's windows as plain token rows (no MTP labels), for
    decoding from held-out prompts."""
    sources = data.source_list()
    common = dict(dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size, seed=seed,
                  shuffle=shuffle, shuffle_buffer=data.shuffle_buffer)
    if purpose == "train":
        return ShardLoader(
            sources, split or "train", num_workers=data.num_workers, depth=depth,
            mask_cross_document=bool(data.mask_cross_document), skip_corrupt=data.skip_corrupt,
            verify_checksums=data.verify_checksums, pin_memory=pin_memory,
            global_batch_size=global_batch_size, remote=data.remote.options(), **common)
    chosen = [s for s in sources if source is None or s.label == source][:1]
    if not chosen:
        raise ValueError(f"no data source is named {source!r}; the sources are "
                         f"{[s.label for s in sources]}")
    return ShardLoader(
        chosen, split or "val", num_workers=0, infinite=False, pin_memory=pin_memory,
        depth=depth if purpose == "validation" else 0,
        mask_cross_document=bool(data.mask_cross_document) and purpose == "validation",
        skip_corrupt=data.skip_corrupt, remote=data.remote.options(), **common)


def weighted_validation(per_source: dict[str, dict[str, float]],
                        data: DataConfig) -> dict[str, float]:
    """One source: its metrics as they are (val/...). A mixture: each source's under
    val/NAME/..., and val/... the mean of the sources weighted like the training mixture (the
    loss the mixture's own distribution would show)."""
    if not data.is_mixture:
        return next(iter(per_source.values()), {})
    weights = {s.label: s.weight for s in data.source_list() if s.label in per_source}
    total = sum(weights.values())
    out: dict[str, float] = {}
    for name, metrics in per_source.items():
        out.update({f"val/{name}/{k[len('val/'):]}": v for k, v in metrics.items()})
    keys = set.intersection(*(set(m) for m in per_source.values())) if per_source else set()
    for key in sorted(keys):
        out[key] = sum(per_source[n][key] * weights[n] for n in per_source) / total
    return out
