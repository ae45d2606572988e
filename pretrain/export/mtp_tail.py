"""The MTP tail as a deployable add-on to an exported main model: its config and its tensors.

The tail file holds only `tail.objective.*` tensors under our own names. At load time it reuses
the main model's shared parts (embedding, head, final norm), so it is valid only next to the main
model it was trained with: `mtp_config.json` records that model's shape, and loading refuses a
main model of another shape. What the tail holds and shares is declared by its objective
(model/mtp/). No file I/O here (pretrain/export/files.py owns the files).
"""

from __future__ import annotations

from typing import Any

import torch

from model.config import DecoderConfig, ModelConfig, MTPConfig
from model.mtp.objective import NO_MTP, objective_class
from model.tail import TAIL_PREFIX
from pretrain.export.hf_llama import check_shapes, tail_shapes

TAIL_FORMAT = "mtp-pretrain/mtp-tail"
TAIL_FORMAT_VERSION = 2  # 2: the objective's options under "options" (1: flat keys)
TAIL_WEIGHTS = "mtp.safetensors"
TAIL_CONFIG = "mtp_config.json"


def model_signature(cfg: ModelConfig) -> dict[str, Any]:
    """The main-model facts a tail depends on. max_seq_len is left out on purpose: inference may
    build longer rotary tables than training used."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "num_kv_heads": cfg.kv_heads,
        "ffn_hidden_size": cfg.ffn_size, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_embeddings": cfg.tie_embeddings,
    }


def tail_tensors(full: dict[str, torch.Tensor], dcfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """The objective's tensors out of a full state dict (names kept), checked against `dcfg`."""
    if dcfg.mtp.kind == NO_MTP:
        raise ValueError("mtp.kind = 'none': this model has no MTP tail to export; export the "
                         "main model only")
    tail = {n: t for n, t in full.items() if n.startswith(TAIL_PREFIX)}
    check_shapes(tail, tail_shapes(dcfg), "the MTP tail in the state dict")
    return tail


def tail_config(dcfg: DecoderConfig, dtype: torch.dtype, source: dict[str, Any]) -> dict[str, Any]:
    """The content of mtp_config.json."""
    mtp = dcfg.mtp
    return {
        "format": TAIL_FORMAT,
        "format_version": TAIL_FORMAT_VERSION,
        "kind": mtp.kind,
        "depth": mtp.depth,
        "options": {name: mtp.option(name) for name in objective_class(mtp.kind).options},
        "weights": TAIL_WEIGHTS,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "model": model_signature(dcfg.model),
        "shares_with_main_model": list(objective_class(mtp.kind).shares_with_main_model),
        "source": source,
    }


def mtp_config_from_tail(cfg_json: dict[str, Any], main: ModelConfig, where: str) -> MTPConfig:
    """MTPConfig from mtp_config.json, refusing a tail made for another model or format."""
    if cfg_json.get("format") != TAIL_FORMAT:
        raise ValueError(f"{where}: format = {cfg_json.get('format')!r}, expected "
                         f"{TAIL_FORMAT!r}; this is not an MTP tail written by export_mtp_tail")
    version = cfg_json.get("format_version")
    if not isinstance(version, int) or version > TAIL_FORMAT_VERSION:
        raise ValueError(f"{where}: format_version = {version!r} is newer than this code reads "
                         f"({TAIL_FORMAT_VERSION}); update the project to load it")
    theirs, ours = cfg_json.get("model", {}), model_signature(main)
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: tail {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{where} was exported for a different model shape ({detail}); use the "
                         "tail exported from the same checkpoint as the main model")
    missing = [k for k in ("kind", "depth") if k not in cfg_json]
    if missing:
        raise ValueError(f"{where} lacks the fields {missing}; re-export the tail")
    section = {k: cfg_json[k] for k in ("kind", "depth", "options") if k in cfg_json}
    if version == 1:  # the three built-in options were flat keys, each written for every kind
        options = {} if section["kind"] == NO_MTP else objective_class(section["kind"]).options
        section["options"] = {k: v for k, v in cfg_json.items() if k in options}
    mtp = MTPConfig(**section)
    mtp.validate()
    if mtp.kind == NO_MTP:
        raise ValueError(f"{where}: kind 'none' has no tail; remove the file")
    return mtp


def check_tail_tensors(tensors: dict[str, torch.Tensor], dcfg: DecoderConfig, where: str) -> None:
    """ValueError unless `tensors` are exactly the tail of `dcfg` (no main-model tensors)."""
    foreign = sorted(n for n in tensors if not n.startswith(TAIL_PREFIX))
    if foreign:
        raise ValueError(f"{where} holds tensors outside the MTP tail ({foreign[:5]}); an MTP "
                         "tail file must hold only tail.objective.* tensors")
    check_shapes(tensors, tail_shapes(dcfg), where)
