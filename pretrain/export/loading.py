"""Load a model for inference from an export directory (HF Llama main model + MTP tail) or from a
training checkpoint / run directory, on one device (TP = 1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model import MTPLanguageModel, accelerator, single_process_context
from model.sharding import load_full_state_dict


@dataclass
class LoadedModel:
    model: MTPLanguageModel
    tokenizer_path: Path | None
    eos_id: int | None
    pad_id: int
    source: str


def read_full_state_dict(path: str | Path):
    """(decoder config, full TP=1 state dict, tokenizer path or None, special ids, a description)
    of an export directory or a training checkpoint / run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        from pretrain.export.files import load_exported_model

        dcfg, full = load_exported_model(path)
        tokenizer = next((path / n for n in ("tokenizer.model", "tokenizer.json")
                          if (path / n).is_file()), None)
        return dcfg, full, tokenizer, _specials_from_tokenizer_config(path), f"export {path}"
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.export.from_checkpoint import (
        checkpoint_tokenizer,
        full_state_dict_from_checkpoint,
    )

    ref = resolve_checkpoint(path)
    cfg, full = full_state_dict_from_checkpoint(ref)
    tokenizer, specials, _ = checkpoint_tokenizer(ref)
    return cfg.decoder, full, tokenizer, specials, f"checkpoint {ref.path}"


def load_for_inference(path: str | Path, dtype: torch.dtype | None = None) -> LoadedModel:
    dcfg, full, tokenizer, specials, source = read_full_state_dict(path)
    ctx = single_process_context()
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
