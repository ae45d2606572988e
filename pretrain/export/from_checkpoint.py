"""Offline, single-process reassembly of a full (TP = 1, unpartitioned) parameter dict from a
training checkpoint of any layout, for export and inference.

* PP = 1, ZeRO 1/2: the module weights of each TP rank (`mp_rank_XX_model_states.pt`).
* PP > 1: DeepSpeed's per-layer files (`layer_II-model_XX-model_states.pt`), mapped back to our
  names (the last stage's tied copy of the embedding is not saved; stage 0's copy is the same).
* ZeRO-3: the fp32 partitions of each TP rank, merged over DP by DeepSpeed's zero_to_fp32.
TP shards are concatenated by each parameter's partition dim/stride, read off a TP = 1 model
built on the meta device (no memory, no init), whose shapes also validate the result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from model.mtp.objective import NO_MTP
from model.sharding import concat_shards, tp_layout
from model.transformer import meta_parameters
from pretrain.checkpoint import CheckpointError, CheckpointRef
from pretrain.config import RunConfig, config_from_dict
from pretrain.model_builder import pipeline_layer_names


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle garbage, I/O error
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err}); the "
                              "checkpoint is damaged: export an earlier one") from None


def _zero3_rank_state(ref: CheckpointRef, tp_rank: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 merges every *_optim_states.pt it finds: show it one TP rank's files only.
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / ref.tag
        view.mkdir()
        for f in ref.path.glob(f"*mp_rank_{tp_rank:02d}_*"):
            os.symlink(f.resolve(), view / f.name)
        return dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ref.tag))


def _tp_shards(ref: CheckpointRef, cfg: RunConfig, tp: int, pp: int) -> list[dict[str, torch.Tensor]]:
    """One {our name: tensor} dict per TP rank."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    if pp > 1:
        for f in sorted(ref.path.glob("layer_*-model_states.pt")):
            layer = int(f.name[6:8])
            tp_rank = int(f.name.split("-model_")[1][:2]) if "-model_" in f.name else 0
            for key, t in _load(f).items():
                name = pipeline_layer_names(cfg.decoder, layer, key)
                if name is not None:
                    shards[tp_rank][name] = t
    elif cfg.parallel.zero_stage == 3:
        for r in range(tp):
            shards[r] = _zero3_rank_state(ref, r)
    else:
        for r in range(tp):
            f = ref.path / f"mp_rank_{r:02d}_model_states.pt"
            if not f.is_file():
                raise CheckpointError(f"{ref.path} lacks {f.name} (TP rank {r} of {tp})")
            shards[r] = dict(_load(f)["module"])
    return shards


def full_state_dict_from_checkpoint(ref: CheckpointRef) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    marker = ref.marker()
    cfg = config_from_dict(marker["config"])
    tp, pp = marker["layout"]["tp"], marker["layout"]["pp"]
    meta = meta_parameters(cfg.decoder)
    shards = _tp_shards(ref, cfg, tp, pp)
    full: dict[str, torch.Tensor] = {}
    problems = []
    for name, p in meta.items():
        parts = [s.get(name) for s in shards]
        if any(t is None for t in parts):
            problems.append(f"{name} missing for TP ranks {[i for i, t in enumerate(parts) if t is None]}")
            continue
        layout = tp_layout(p)
        full[name] = parts[0] if layout is None else concat_shards(parts, *layout)
        if tuple(full[name].shape) != tuple(p.shape):
            problems.append(f"{name}: shape {tuple(full[name].shape)} but the config implies "
                            f"{tuple(p.shape)}")
    # megatron-core's linear layers carry an `_extra_state` entry (Transformer Engine's fp8 state)
    extra = sorted({n for s in shards for n in s if not n.endswith("._extra_state")} - set(meta))
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}")
    if problems:
        raise CheckpointError(
            f"{ref.path} does not match the model its own config describes (wrong or mixed "
            f"files?): {'; '.join(problems[:10])}")
    return cfg, full


def checkpoint_tokenizer(ref: CheckpointRef) -> tuple[Path | None, dict[str, int], str | None]:
    """(tokenizer model, special ids, why there is none) of the dataset a checkpoint trained on,
    read from the dataset manifest the checkpoint names."""
    from data_pipeline import load_manifest

    try:
        manifest = load_manifest(ref.marker()["manifest"], check_files=False)
    except (OSError, ValueError, KeyError) as err:
        return None, {}, f"dataset manifest unavailable ({err})"
    return manifest.tokenizer_path, manifest.special_ids, None


def export_checkpoint(ref: CheckpointRef, out_dir: str | os.PathLike, *, with_mtp: bool,
                      dtype: torch.dtype | None, overwrite: bool, warn=print) -> Path:
    """A checkpoint → an export directory (the main model as HF Llama, plus the MTP tail with
    `with_mtp`), with the tokenizer of its dataset when that is still there."""
    from pretrain.export.files import export_main_model

    cfg, full = full_state_dict_from_checkpoint(ref)
    if with_mtp and cfg.mtp.kind == NO_MTP:
        raise ValueError("this run trained no MTP tail (mtp.kind = 'none'): export the main "
                         "model alone (without --with-mtp)")
    tokenizer, special, missing = checkpoint_tokenizer(ref)
    if missing:
        warn(f"{missing}; exporting without a tokenizer")
    return export_main_model(
        out_dir, full, cfg.decoder, tokenizer_model_path=tokenizer, dtype=dtype,
        special_token_ids=special or None, overwrite=overwrite, include_mtp=with_mtp,
        metadata={"checkpoint": str(ref.path), "step": ref.step, "run_dir": cfg.run_dir})
