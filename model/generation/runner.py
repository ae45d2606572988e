"""What plain and speculative decoding share: the cached forward of the main model (TP = 1 or
TP > 1 alike) and the device buffers of a batch of requests (`Slot`)."""

from __future__ import annotations

import torch

from model.kv_cache import KVCache
from model.transformer import MTPLanguageModel


def new_cache(model: MTPLanguageModel, batch: int, max_len: int) -> KVCache:
    """The main model's KV cache for `batch` sequences of up to `max_len` positions."""
    w = model.embedding.output_weight
    return KVCache(model.blocks[0].attn, len(model.blocks), batch, max_len, w.dtype, w.device)


def main_forward(model: MTPLanguageModel, cache: KVCache, tokens: torch.Tensor,
                 positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """tokens, positions [B, T] → the last block's output [B, T, d] (before the final norm)."""
    h = model.embedding.embed(tokens)
    for block, layer in zip(model.blocks, cache.layers(positions, attend_len)):
        h = block(h, layer)
    return h


def positions_needed(prompt_len: int, new_tokens: int, drafts: int | None = None) -> int:
    """Positions (cache slots, rotary angles) that decoding `new_tokens` after a prompt of
    `prompt_len` tokens uses: one beyond them for plain decoding (`draft_depth` None: the slot of
    the last sampled token); 2·drafts + 2 beyond them for self-speculative decoding with
    `drafts` drafts a round (the last round verifies a full draft past the final kept token)."""
    extra = 1 if drafts is None else 2 * drafts + 2
    return prompt_len + new_tokens + extra


class Slot:
    """The device buffers of one (batch bucket, cache-length bucket): the tokens, the main
    model's KV cache and each sequence's progress. Captured decoding graphs read and write
    exactly these tensors, and every request of the bucket refills them (`load`), so the graphs
    are replayed request after request.

    Per sequence b: `tokens[b, :lengths_b]` is the prompt, generated tokens follow it; `m_b` is
    the index of the newest final token (not yet in the main model's cache); the sequence is
    active until it has `max_new` tokens (m_b reaches `limit_b`) or produced the EOS id. Rows
    past the request's batch are inactive from the start. Inactive rows are still computed (the
    shapes are fixed) but neither advance nor count."""

    def __init__(self, model: MTPLanguageModel, batch: int, max_len: int):
        w = model.embedding.output_weight
        self.batch, self.max_len, self.device = batch, max_len, w.device
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long, device=w.device)
        self.cache = new_cache(model, batch, max_len)
        self.request = torch.zeros(4, batch, dtype=torch.long, device=w.device)
        """Filled per request in one copy: prompt lengths, limits, initially active, EOS id
        (read through the properties below: compiled regions index the buffer itself, where
        stored views would make them guard on the views' offsets, which depend on the batch)."""
        self.values = torch.zeros(2, dtype=torch.float32, device=w.device)
        """Filled per request: temperature, top-p (0-dim views below, read by samplers)."""
        self.temperature, self.top_p = self.values[0], self.values[1]
        self.m = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.active = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.rows = torch.arange(batch, device=w.device)
        self.positions = torch.arange(max_len, device=w.device).expand(batch, max_len)

    @property
    def lengths(self) -> torch.Tensor:
        return self.request[0]

    @property
    def limit(self) -> torch.Tensor:
        """Index that the newest token reaches when a sequence has max_new tokens."""
        return self.request[1]

    @property
    def start_active(self) -> torch.Tensor:
        return self.request[2]

    @property
    def eos(self) -> torch.Tensor:
        """The EOS id on every row (-1: none)."""
        return self.request[3]

    def load(self, prompts: list[list[int]], max_new: int, eos_id: int | None, pad_id: int,
             width: int, temperature: float, top_p: float) -> None:
        """Copy a request in: the prompts right-padded to `width` (their bucket), and its
        per-sequence values (host → device copies, no synchronisation)."""
        b = len(prompts)
        rows = [p + [pad_id] * (width - len(p)) for p in prompts]
        rows += [[pad_id] * width] * (self.batch - b)
        tokens = torch.tensor(rows, dtype=torch.long)  # [B, width]
        request = torch.zeros(4, self.batch, dtype=torch.long)
        request[0] = 1  # padding rows: a one-token "prompt", inactive
        request[0, :b] = torch.tensor([len(p) for p in prompts])
        request[1] = request[0] + max_new - 1
        request[2, :b] = 1
        request[3] = -1 if eos_id is None else eos_id
        self.tokens[:, :width].copy_(tokens, non_blocking=True)
        self.request.copy_(request, non_blocking=True)
        self.values.copy_(torch.tensor([temperature or 1.0, top_p]), non_blocking=True)

    def start(self) -> None:
        """Each sequence's newest token is the one after its prompt (device side)."""
        self.m.copy_(self.lengths)
        self.active.copy_(self.start_active)

    def finish_step(self, eos_hit: torch.Tensor | None) -> None:
        """After `m` advanced: deactivate the sequences that reached their limit or, where
        `eos_hit` [B] (None: the request has no EOS id), produced the EOS id this step."""
        self.active.mul_(self.m < self.limit)
        if eos_hit is not None:
            self.active.mul_(eos_hit.logical_not())


def finish(generated: list[list[int]], max_new: int, eos_id: int | None) -> list[list[int]]:
    """Each sequence cut at max_new tokens and after its first EOS."""
    out = []
    for seq in generated:
        seq = seq[:max_new]
        if eos_id is not None and eos_id in seq:
            seq = seq[: seq.index(eos_id) + 1]
        out.append(seq)
    return out
