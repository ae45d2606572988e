"""Offline conversion of a checkpoint to the tensor-parallel size it will be resumed at.

Any checkpoint resumes onto any layout (pretrain/checkpoint_state.py), but a rank whose TP size
differs from the writer's reassembles every parameter from all the old shards. Converted, each
parameter is stored as whole TP shards of the target size — one file per target TP rank, every
fragment a whole shard — so a rank of the new layout reads its own shard and nothing else
(data-parallel ranks and ZeRO stages cut their fragments out of it at load). The source is only
read: the result is written to a temporary directory next to --out and renamed into place, so a
conversion killed at any point leaves the source as it was and no half-written output. The
temporary directory names its process (OWNER.json); the next conversion to the same --out
removes those whose process has ended on this machine (at 8B a leftover is ~100 GB).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from model.sharding import shard_tensor, tp_layout
from model.transformer import meta_parameters
from pretrain.checkpoint import COMPLETE, CheckpointError, CheckpointRef, layout_of
from pretrain.checkpoint_state import FIELDS, SavedState, write_rank_files
from pretrain.config import ConfigError, config_from_dict, validate_layout
from pretrain.run_lock import process_ended, this_process

LAYOUT_KEYS = ("tp", "pp", "dp", "zero")
OWNER = "OWNER.json"  # in a conversion's temporary directory: the process writing it


def parse_layout(text: str) -> dict[str, int]:
    """'tp=2,pp=1,dp=4,zero=1' → a layout (keys left out keep the checkpoint's)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in LAYOUT_KEYS or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout {text!r}: {part!r} is not KEY=N with KEY one of "
                              f"{', '.join(LAYOUT_KEYS)} and N >= 1 (e.g. tp=2,pp=1,dp=4,zero=1)")
        out[key] = int(value)
    return out


def convert(ref: CheckpointRef, out: Path, layout: dict[str, int], progress: bool = True,
            announce=None, removed=None) -> dict:
    """Write `ref` converted for `layout` (tp, pp, dp, zero; missing keys: the checkpoint's) to
    `out`. `announce(source, target)` is called once the request is known to be valid, before
    any writing; `removed(path)` for each leftover of an interrupted conversion to `out` that
    is deleted. Returns the target layout."""
    marker = ref.marker()
    source = layout_of(marker)
    target = {**source, **layout}
    cfg_dict = json.loads(json.dumps(marker["config"]))
    cfg_dict["parallel"].update(tp=target["tp"], pp=target["pp"], zero_stage=target["zero"])
    try:
        cfg = config_from_dict(cfg_dict)
        validate_layout(cfg, target["tp"] * target["pp"] * target["dp"])
    except ConfigError as err:
        asked = ",".join(f"{k}={v}" for k, v in layout.items())
        raise ConfigError(f"--layout {asked}: {err}") from None
    if out.exists():
        raise ConfigError(f"--out {out} exists; choose a new directory")
    try:
        saved = SavedState(ref.path)
    except FileNotFoundError as err:
        raise CheckpointError(f"{ref.path}: {err}; it is not a checkpoint of this format") from None
    if announce is not None:
        announce(source, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _remove_leftovers(out):
        if removed is not None:
            removed(leftover)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    t0 = time.perf_counter()
    try:
        (tmp / OWNER).write_text(json.dumps(this_process()))
        _write_shards(saved, meta_parameters(cfg.decoder), target["tp"], tmp, progress)
        new_marker = {**marker, "layout": {"world": target["tp"] * target["pp"] * target["dp"],
                                           **target},
                      "config": cfg.to_dict(),
                      "converted_from": {"checkpoint": str(ref.path), "layout": source,
                                         "seconds": round(time.perf_counter() - t0, 3)}}
        (tmp / OWNER).unlink()
        (tmp / COMPLETE).write_text(json.dumps(new_marker, indent=1))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary directories of earlier conversions to `out` whose process has ended
    (killed, or its node lost); one without a readable OWNER.json is being created, or is not
    ours to judge, and stays."""
    removed = []
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        try:
            owner = json.loads((tmp / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if process_ended(owner):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _write_shards(saved: SavedState, meta: dict, tp: int, directory: Path,
                  progress: bool) -> None:
    """One `state_rankNNNNN` pair per target TP rank: every parameter's shard of that rank
    (parameters replicated over TP: in rank 0's file), each a single whole fragment."""
    tensors: list[dict] = [{} for _ in range(tp)]
    index: list[dict] = [{} for _ in range(tp)]
    for name, p in tqdm(meta.items(), desc="converting", unit="param", disable=not progress):
        layout = tp_layout(p)
        ranks = range(tp) if layout is not None else (0,)
        for field in FIELDS:
            if not saved.has(name, field):
                continue
            full = saved.full(name, field, layout)
            for r in ranks:
                shard = full if layout is None else shard_tensor(full, *layout, r, tp)
                tensors[r][f"{name}|{r}|{field}"] = shard.reshape(-1).contiguous()
        shard_shape = list(p.shape)
        if layout is not None:
            shard_shape[layout[0]] //= tp
        for r in ranks:
            index[r][name] = [{"tp_rank": r, "tp_size": tp if layout is not None else 1,
                               "shard_shape": shard_shape, "start": 0,
                               "numel": math.prod(shard_shape),
                               "fields": [f for f in FIELDS if saved.has(name, f)]}]
    for r in range(tp):
        write_rank_files(directory, r, index[r], tensors[r])
