"""Load a model for inference from an export directory (HF Llama main model + MTP tail) or from a
training checkpoint / run directory: on one device (TP = 1), or sliced over a tensor-parallel
group (each rank its shards)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from model import MTPLanguageModel, ParallelContext, accelerator, single_process_context
from model.sharding import load_full_state_dict
from model.transformer import meta_parameters


@dataclass
class LoadedModel:
    model: MTPLanguageModel
    tokenizer_path: Path | None
    eos_id: int | None
    pad_id: int
    source: str


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded: missing, incomplete, damaged or not a model."""


_GIVE = ("give an export directory (written by `mtp export`) or a training run or checkpoint "
         "directory")
# Files of an export besides config.json: a directory holding some of them but no config.json is
# an export whose writing did not finish (or that lost a file), not a run directory.
_EXPORT_FILES = ("model.safetensors", "model.safetensors.index.json", "export_metadata.json",
                 "mtp.safetensors", "mtp_config.json", "generation_config.json")


def read_full_state_dict(path: str | Path):
    """(decoder config, full TP=1 state dict, tokenizer path or None, special ids, a description)
    of an export directory or a training checkpoint / run directory. A path that holds no usable
    model raises ModelLoadError (or CheckpointError for a damaged checkpoint)."""
    from safetensors import SafetensorError

    from pretrain.checkpoint import CheckpointError, complete_checkpoints, resolve_checkpoint

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; {_GIVE}")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a model directory; {_GIVE}")
    if (path / "config.json").is_file():
        from pretrain.export.files import load_exported_model

        try:
            dcfg, full = load_exported_model(path)
        except (ValueError, OSError, SafetensorError) as err:
            raise ModelLoadError(f"the export {path} cannot be loaded ({err}); export it "
                                 f"again (`mtp export RUN --out {path} --overwrite`)") from None
        tokenizer = next((path / n for n in ("tokenizer.model", "tokenizer.json")
                          if (path / n).is_file()), None)
        return dcfg, full, tokenizer, _specials_from_tokenizer_config(path), f"export {path}"
    present = [n for n in _EXPORT_FILES if (path / n).exists()]
    if present and not complete_checkpoints(path / "checkpoints"):
        raise ModelLoadError(f"{path} is an incomplete export: it has {', '.join(present)} but no "
                             f"config.json; export it again (`mtp export RUN --out {path} "
                             "--overwrite`)")
    from pretrain.export.from_checkpoint import (
        checkpoint_tokenizer,
        full_state_dict_from_checkpoint,
    )

    try:
        ref = resolve_checkpoint(path)
    except CheckpointError as err:
        raise ModelLoadError(f"{path} is neither an export (no config.json) nor a run or "
                             f"checkpoint directory ({err}); {_GIVE}") from None
    cfg, full = full_state_dict_from_checkpoint(ref)
    tokenizer, specials, _ = checkpoint_tokenizer(ref)
    return cfg.decoder, full, tokenizer, specials, f"checkpoint {ref.path}"


def load_for_inference(path: str | Path, dtype: torch.dtype | None = None,
                       ctx: ParallelContext | None = None,
                       mtp_depth: int | None = None) -> LoadedModel:
    """The model at `path` in eval mode on this process's device. `ctx`: a tensor-parallel
    context to slice the weights over (default: TP = 1). `mtp_depth`: keep only the first
    `mtp_depth` MTP depths of the tail (a DeepSeek model's first module alone is a D = 1
    drafter; parallel and blockwise heads are independent of each other)."""
    dcfg, full, tokenizer, specials, source = read_full_state_dict(path)
    if mtp_depth is not None and mtp_depth != dcfg.mtp.depth:
        if not 1 <= mtp_depth <= dcfg.mtp.depth:
            raise ValueError(f"mtp_depth = {mtp_depth}: {path} has an MTP tail of depth "
                             f"{dcfg.mtp.depth}; keep 1..{dcfg.mtp.depth} of its depths")
        dcfg = dataclasses.replace(dcfg, mtp=dataclasses.replace(dcfg.mtp, depth=mtp_depth))
        kept = meta_parameters(dcfg)
        full = {k: v for k, v in full.items() if k in kept}
        source += f" (MTP depths 1..{mtp_depth})"
    ctx = ctx or single_process_context()
    model = MTPLanguageModel(dcfg, ctx)
    load_full_state_dict(model, full, ctx.tp_group)
    device = accelerator.current_device()
    model = model.to(device=device, dtype=dtype or accelerator.default_dtype()).eval()
    return LoadedModel(model, tokenizer, specials.get("eos"), specials.get("pad", 0), source)


def _specials_from_tokenizer_config(path: Path) -> dict:
    import json

    meta = path / "config.json"
    cfg = json.loads(meta.read_text())
    return {k: cfg[f"{k}_token_id"] for k in ("eos", "pad", "bos") if cfg.get(f"{k}_token_id") is not None}
