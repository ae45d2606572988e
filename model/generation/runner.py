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


def positions_needed(prompt_len: int, new_tokens: int, draft_depth: int | None = None) -> int:
    """Positions (cache slots, rotary angles) that decoding `new_tokens` after a prompt of
    `prompt_len` tokens uses: one beyond them for plain decoding (`draft_depth` None: the slot of
    the last sampled token); 2·depth + 2 beyond them for self-speculative decoding with drafts of
    `draft_depth` tokens (the last round verifies a full draft past the final kept token)."""
    extra = 1 if draft_depth is None else 2 * draft_depth + 2
    return prompt_len + new_tokens + extra


def check_fits(prompt_len: int, new_tokens: int, max_seq_len: int,
               draft_depth: int | None = None) -> int:
    """`positions_needed`, or ValueError when it exceeds the model's context."""
    need = positions_needed(prompt_len, new_tokens, draft_depth)
    if need > max_seq_len:
        extra = "1" if draft_depth is None else f"2·depth + 2 ({2 * draft_depth + 2})"
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({new_tokens}) + {extra} = {need} exceeds "
            f"model.max_seq_len = {max_seq_len}; shorten the prompt or generate fewer tokens")
    return need


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
