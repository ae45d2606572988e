"""Draft proposals from the MTP tail for self-speculative decoding: the base class that each
objective's drafter (declared beside the objective in model/mtp/) builds on.

State shared with the verifier (`speculative.py`), per sequence b:
* `tokens[b, :m_b+1]` are final: m_b is the index of the newest token, which the main model has
  not processed yet; the main model's cache holds positions 0..m_b-1.
* `trunk[b, i]` / `normed[b, i]`: the main model's last-block output and its final-norm output at
  position i (true for i < m_b).
`catch_up(m)` brings the drafter's own caches up to date for positions < m and returns the drafts
for tokens m+1..m+N ([B, N]) plus, when sampling, the draft distributions ([B, N, V]). N, the
drafts a round verifies, is the objective's depth D unless the decoder asks for another count:
fewer (any objective) or more (a drafter that `chains`: it reapplies its last depth to its own
output, as DeepSeek's modules allow).

Shapes are static, so that a decoding round is captured once as a device graph and replayed for
every later round and request: every window has a fixed width (`_window`: the most that one
round can add) and attends over the whole cache through the position mask, and there is no host
synchronisation. The drafter's state is updated in place for the same reason (a replay writes
the addresses seen at capture). A drafter serves one request after another: its first catch-up
of a request (right after the prompt's prefill) runs with `prompt_width` set, and `_window` then
covers positions 0..prompt_width-1 whatever the window start held from earlier requests. A drafter
whose state `_window` does not cover must not read that state on this first catch-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.kv_cache import KVCache

if TYPE_CHECKING:
    from model.generation.draft_vocab import DraftVocabulary
    from model.generation.sampling import Sampler
    from model.transformer import MTPLanguageModel


def rows_at(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """t [B, S, d] gathered at positions [B, W] → [B, W, d]."""
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


def put_rows(t: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
    """t [B, S, d] at positions [B, W] ← rows [B, W, d]. Indexed assignment rather than
    `scatter_`: in compiled regions Inductor writes it in place, where a scatter into an input
    becomes a copy of the whole tensor."""
    t[torch.arange(t.shape[0], device=t.device)[:, None], positions] = rows


def check_drafts(drafter: type[Drafter], depth: int, drafts: int | None) -> int:
    """The number of drafts per round that `drafter` will make for a tail of `depth` when asked
    for `drafts` (None: the depth); ValueError for a count it cannot draft."""
    if drafts is None:
        return depth
    if drafts < 1:
        raise ValueError(f"draft_tokens = {drafts} must be >= 1")
    if drafts > depth and not drafter.chains:
        raise ValueError(
            f"draft_tokens = {drafts} exceeds this tail's depth {depth}, and its drafts cannot "
            "be chained (only DeepSeek modules reapply their last depth); use at most "
            f"{depth}")
    return drafts


CHAINED_DRAFTS = 2
"""Drafts past the depth that `recommended_drafts` adds where a tail chains."""


def recommended_drafts(drafter: type[Drafter], depth: int) -> int:
    """Drafts a round for the fastest decoding measured: D + 2 where the last depth chains
    (DeepSeek), D otherwise. At gpt-110m (D = 1 and D = 3) and gpt-350m (D = 3) two chained
    drafts were faster than none at batch 1, 8 and 32 (benchmarks/RESULTS.md, "Drafting past
    the depth"); a third added little or lost."""
    return depth + (CHAINED_DRAFTS if drafter.chains else 0)


class Drafter:
    """Drafts for a batch of `batch` sequences in a cache of `max_len` positions. Subclasses
    implement `catch_up` (see the module docstring) and read their objective's modules as
    `self.model.tail.objective`; they choose tokens with `_pick` from a module's normed output
    (never from logits: the head may be the reduced draft vocabulary's)."""

    chains = False
    """Whether it can draft more tokens than its depth (by reapplying the last depth)."""

    def __init__(self, model: MTPLanguageModel, batch: int, max_len: int,
                 drafts: int | None = None):
        self.model = model
        self.depth = model.config.mtp.depth
        self.drafts = check_drafts(type(self), self.depth, drafts)
        """N: tokens drafted per round (a round moves m by at most N + 1)."""
        self.max_len = max_len
        self.device = model.embedding.output_weight.device
        self.batch = batch
        self.dtype = model.embedding.output_weight.dtype
        self.rows = torch.arange(batch, device=self.device)
        self.sampler: Sampler | None = None
        """How tokens are chosen (set by the decoder before every catch-up it runs or
        captures)."""
        self.prompt_width = 0
        """Non-zero on the first catch-up of a request: windows then start at position 0 and
        span this many positions (the prompt's bucket)."""
        self.vocab: DraftVocabulary | None = None
        """Draft over these tokens only (model/generation/draft_vocab.py); None: all."""

    def _block_caches(self, blocks) -> list[KVCache]:
        """One single-layer KV cache per draft block (an MTP module's or a head's)."""
        return [KVCache(blk.attn, 1, self.batch, self.max_len, self.dtype, self.device)
                for blk in blocks]

    def _pick(self, hidden: torch.Tensor):
        """A draft module's normed output [B, d] → (tokens [B], the draft distribution [B, V]
        or None when greedy), through the output head or the reduced draft vocabulary."""
        assert self.sampler is not None, "the decoder sets the sampler before drafting"
        assert hidden.shape[-1] == self.model.config.model.hidden_size, (
            "Drafter._pick takes a draft module's normed output [B, d], not logits")
        if self.vocab is None:
            return self.sampler.pick(self.model.embedding.logits(hidden))
        picked, probs = self.sampler.pick(self.vocab.logits(hidden))  # over the K tokens
        return self.vocab.ids[picked], (None if probs is None else self.vocab.scatter(probs))

    def _window(self, start: torch.Tensor, m: torch.Tensor, round_width: int):
        """Positions [B, W] from start_b to m_b - 1 and each sequence's last index in it.
        W is `round_width` (an upper bound of m_b - start_b after a round) or, on a request's
        first catch-up, the prompt's width with every window starting at 0. Windows run on past
        m_b - 1: those rows are computed and ignored, and the cache entries they write lie at
        positions ≥ m_b, which are recomputed before anything attends them."""
        if self.prompt_width:
            start, width = torch.zeros_like(start), self.prompt_width
        else:
            width = round_width
        offsets = torch.arange(width, device=self.device)
        # The clamp only touches padding rows: real positions stay below max_len - 1.
        positions = (start[:, None] + offsets).clamp(max=self.max_len - 1)  # [B, W]
        last = m - 1 - start  # [B] index of position m_b - 1 in the window
        return positions, last

    def catch_up(self, tokens: torch.Tensor, trunk: torch.Tensor, normed: torch.Tensor,
                 m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @staticmethod
    def _stacked(drafts: list[torch.Tensor], probs: list[torch.Tensor | None]):
        """Per-draft picks → (drafts [B, N], draft probabilities [B, N, V] or None)."""
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs[0] is not None else None)
