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

from model import MTPLanguageModel, single_process_context
from model.sharding import tp_layout
from pretrain.checkpoint import CheckpointError, CheckpointRef
from pretrain.config import RunConfig, config_from_dict
from pretrain.model_builder import pipeline_layer_names


def _meta_params(cfg: RunConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = MTPLanguageModel(cfg.decoder, single_process_context())
    return dict(model.named_parameters())


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
    meta = _meta_params(cfg)
    shards = _tp_shards(ref, cfg, tp, pp)
    full: dict[str, torch.Tensor] = {}
    problems = []
    for name, p in meta.items():
        parts = [s.get(name) for s in shards]
        if any(t is None for t in parts):
            problems.append(f"{name} missing for TP ranks {[i for i, t in enumerate(parts) if t is None]}")
            continue
        layout = tp_layout(p)
        if layout is None:
            full[name] = parts[0]
        else:
            dim, stride = layout
            blocks = [t.chunk(stride, dim=dim) for t in parts]  # [rank][block]
            full[name] = torch.cat([blocks[r][b] for b in range(stride) for r in range(tp)], dim=dim)
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
            "files?):\n  " + "\n  ".join(problems[:10]))
    return cfg, full
