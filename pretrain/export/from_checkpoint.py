"""Offline, single-process reassembly of a full (TP = 1) parameter dict from a training
checkpoint of any layout, for export and inference: the fp32 masters of the layout-free state
(pretrain/checkpoint_state.py), TP shards joined by each parameter's partition dim and stride as
read off a TP = 1 model built on the meta device (no memory, no init), whose shapes also validate
the result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from model.mtp.objective import NO_MTP
from model.sharding import tp_layout
from model.transformer import meta_parameters
from pretrain.checkpoint import CheckpointError, CheckpointRef
from pretrain.checkpoint_state import MASTER, SavedState
from pretrain.config import RunConfig, config_from_dict


def full_state_dict_from_checkpoint(ref: CheckpointRef) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The run's config and its full (TP = 1) fp32 parameters, from a checkpoint of any layout."""
    marker = ref.marker()
    try:
        cfg = config_from_dict(marker["config"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ref.path / 'COMPLETE.json'} holds no usable config ({err})") \
            from None
    try:
        saved = SavedState(ref.path)
    except FileNotFoundError:
        raise CheckpointError(f"{ref.path} holds no layout-free state files; it was written by "
                              "an older version of the project") from None
    except ValueError as err:
        raise CheckpointError(f"{err}; export an earlier checkpoint") from None
    meta = meta_parameters(cfg.decoder)
    missing = [n for n in meta if not saved.has(n, MASTER)]
    extra = sorted(set(saved.names()) - set(meta))
    if missing or extra:
        raise CheckpointError(
            f"{ref.path} does not match the model its own config describes: missing "
            f"{missing[:5]}, unexpected {extra[:5]}")
    full = {}
    for name, p in meta.items():
        try:
            full[name] = saved.full(name, MASTER, tp_layout(p))
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{err}; the checkpoint is damaged, export an earlier one") \
                from None
        if tuple(full[name].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{ref.path} does not match the model its own config describes (wrong or mixed "
                f"files?): {name}: shape {tuple(full[name].shape)} but the config implies "
                f"{tuple(p.shape)}")
    return cfg, full


def checkpoint_tokenizer(ref: CheckpointRef) -> tuple[Path | None, dict[str, int], str | None]:
    """(tokenizer model, special ids, why there is none) of the dataset a checkpoint trained on,
    read from the dataset manifest the checkpoint names."""
    from data_pipeline import load_manifest

    try:
        manifest = load_manifest(ref.marker()["manifest"], check_files=False)
        if manifest.is_local:
            path = manifest.tokenizer_path
        else:  # a published dataset: a local copy, named by content
            path = Path(tempfile.gettempdir()) / (f"mtp-tokenizer-{manifest.tokenizer_sha256}-"
                                                  f"{manifest.tokenizer_name}")
            if not path.is_file():
                path.write_bytes(manifest.read_tokenizer())
    except (OSError, ValueError, KeyError) as err:
        return None, {}, f"dataset manifest unavailable ({err})"
    return path, {k: v for k, v in manifest.special_ids.items() if v is not None}, None


def export_checkpoint(ref: CheckpointRef, out_dir: str | os.PathLike, *, with_mtp: bool,
                      dtype: torch.dtype | None, overwrite: bool, warn=print) -> Path:
    """A checkpoint → an export directory (the main model as HF Llama, plus the MTP tail with
    `with_mtp`), with the tokenizer of its dataset when that is still there. `dtype` None: the
    precision the run trained in (its fp32 masters cast to bf16 for a bf16 run)."""
    from pretrain.export.files import export_main_model

    cfg, full = full_state_dict_from_checkpoint(ref)
    if dtype is None:
        trained = ref.marker().get("runtime", {}).get("precision", "fp32")
        dtype = torch.bfloat16 if trained == "bf16" else torch.float32
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
