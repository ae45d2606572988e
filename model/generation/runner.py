"""Cached forward passes of the main model for generation (TP = 1 or TP > 1 alike)."""

from __future__ import annotations

import torch

from model.kv_cache import KVCache
from model.transformer import MTPLanguageModel


def new_cache(model: MTPLanguageModel, num_layers: int, batch: int, max_len: int,
              device: torch.device) -> KVCache:
    cfg = model.config.model
    attn = model.blocks[0].attn
    dtype = model.embedding.output_weight.dtype
    return KVCache(num_layers, batch, attn.groups, max_len, cfg.head_dim, dtype, device)


def main_forward(model: MTPLanguageModel, cache: KVCache, tokens: torch.Tensor,
                 positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """tokens, positions [B, T] → the last block's output [B, T, d] (before the final norm)."""
    h = model.embedding(tokens)
    for i, block in enumerate(model.blocks):
        h = block(h, cache.layer(i, positions, attend_len))
    return h


def pad_prompts(prompts: list[list[int]], pad_id: int, device: torch.device):
    """Right-padded [B, P] tokens and the prompt lengths [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), lengths.to(device)


def finish(generated: list[list[int]], max_new: int, eos_id: int | None) -> list[list[int]]:
    out = []
    for seq in generated:
        seq = seq[:max_new]
        if eos_id is not None and eos_id in seq:
            seq = seq[: seq.index(eos_id) + 1]
        out.append(seq)
    return out


def done(generated: list[list[int]], max_new: int, eos_id: int | None) -> list[bool]:
    return [len(s) >= max_new or (eos_id is not None and eos_id in s) for s in generated]
