"""The one place that turns a run's data config into loaders: the datasets' manifests checked
against the model, then training batches, validation batches and held-out prompts, for the
trainer and for `mtp eval` alike."""

from __future__ import annotations

from typing import Literal

from data_pipeline import Manifest, ShardError, ShardLoader, load_manifest
from data_pipeline.mixture import check_same_tokenizer
from pretrain.config import ConfigError, DataConfig, RunConfig

Purpose = Literal["train", "validation", "prompts"]


def load_manifests(cfg: RunConfig) -> list[tuple[str, Manifest]]:
    """(source label, manifest) of every data source, after checking each against the model and
    all of them against each other (a mixture shares one tokenizer)."""
    data = cfg.data
    manifests = []
    for i, source in enumerate(data.source_list()):
        key = "data.path" if data.path else f"data.sources[{i}].path"
        try:
            # With skip_corrupt the loader checks (and skips, counting) the shards itself.
            manifest = load_manifest(source.path, check_files=not data.skip_corrupt,
                                     remote=data.remote.options())
        except ShardError:
            raise
        except ValueError as err:  # no/unreadable manifest, tokenizer replaced after the build
            raise ConfigError(f"{key} = {source.path!r}: {err}") from None
        _check_dataset(cfg, manifest, source.path)
        manifests.append((source.label, manifest))
    try:
        check_same_tokenizer(manifests)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return manifests


def _check_dataset(cfg: RunConfig, manifest: Manifest, path: str) -> None:
    m = cfg.model
    if manifest.vocab_size > m.vocab_size:
        raise ConfigError(
            f"the dataset's tokenizer has {manifest.vocab_size} tokens but model.vocab_size = "
            f"{m.vocab_size}; set model.vocab_size >= {manifest.vocab_size} (padding to a "
            "multiple of the TP size is fine)")
    if cfg.mtp.depth > manifest.max_depth:
        raise ConfigError(
            f"mtp.depth = {cfg.mtp.depth} but the dataset at {path} was built for "
            f"max_depth {manifest.max_depth}; rebuild it with `mtp prepare --max-depth "
            f"{cfg.mtp.depth}` or lower mtp.depth")
    if manifest.seq_len > m.max_seq_len:
        raise ConfigError(
            f"the dataset's windows have seq_len {manifest.seq_len} but model.max_seq_len = "
            f"{m.max_seq_len}; raise model.max_seq_len")
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and manifest.seq_len % tp:
        raise ConfigError(
            f"parallel.sequence_parallel = true splits the sequence over parallel.tp = {tp} "
            f"ranks, but the dataset's seq_len {manifest.seq_len} is not divisible by {tp}; "
            "build the data with a divisible --seq-len or turn sequence parallelism off")


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
