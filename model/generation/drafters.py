"""Draft proposals from the MTP tail for self-speculative decoding, one class per objective.

State shared with the verifier (`speculative.py`), per sequence b:
* `tokens[b, :m_b+1]` are final: m_b is the index of the newest token, which the main model has
  not processed yet; the main model's cache holds positions 0..m_b-1.
* `trunk[b, i]` / `normed[b, i]`: the main model's last-block output and its final-norm output at
  position i (true for i < m_b).
`catch_up(m)` brings the drafter's own caches up to date for positions < m and returns the drafts
for tokens m+1..m+D ([B, D]) plus, when sampling, the draft distributions ([B, D, V]).

With `static=True` every window has a fixed width (the most that one round can add) and attends
over the whole cache through the position mask, so a round has the same shapes every time and no
host synchronisation: the speculative decoder then captures it as a device graph. The drafter's
state is updated in place for the same reason (a replay writes the addresses seen at capture).
"""

from __future__ import annotations

import torch

from model.generation.sampling import SamplingConfig, probabilities, sample
from model.kv_cache import KVCache
from model.transformer import MTPLanguageModel


def _rows(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """t [B, S, d] gathered at positions [B, W] → [B, W, d]."""
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


def _put_rows(t: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
    t.scatter_(1, positions[..., None].expand(-1, -1, t.shape[-1]), rows)


class Drafter:
    def __init__(self, model: MTPLanguageModel, batch: int, max_len: int, sampling: SamplingConfig,
                 generator: torch.Generator | None):
        self.model = model
        self.depth = model.config.mtp.depth
        self.sampling = sampling
        self.generator = generator
        self.max_len = max_len
        self.device = model.embedding.output_weight.device
        self.batch = batch
        self.dtype = model.embedding.output_weight.dtype
        self.static = False
        """Fixed window widths and whole-cache attention (set by the decoder once the prompt has
        been caught up; see the module docstring)."""

    def _block_caches(self, blocks) -> list[KVCache]:
        """One single-layer KV cache per draft block (an MTP module's or a head's)."""
        hd = self.model.config.model.head_dim
        return [KVCache(1, self.batch, blk.attn.groups, self.max_len, hd, self.dtype, self.device)
                for blk in blocks]

    def _pick(self, logits: torch.Tensor):
        """[B, V] → (tokens [B], probs [B, V] or None)."""
        if self.sampling.greedy:
            return logits.argmax(dim=-1), None
        probs = probabilities(logits.cpu(), self.sampling)
        return sample(probs, self.generator).to(self.device), probs

    def _window(self, start: torch.Tensor, m: torch.Tensor, static_width: int):
        """Positions [B, W] from start_b to m_b - 1, each sequence's last index in it, and the
        cache length to attend. Windows are padded to a common width by running on past
        m_b - 1: those rows are computed and ignored, and the cache entries they write lie at
        positions ≥ m_b, which are recomputed before anything attends them. Dynamic: W is the
        longest window; static: W = `static_width` (an upper bound) and the whole cache."""
        if self.static:
            width, attend = static_width, self.max_len
        else:
            width = int((m - start).max())
            attend = int((start + width).max())
        offsets = torch.arange(width, device=self.device)
        # The clamp only touches padding rows: real positions stay below max_len - 1.
        positions = (start[:, None] + offsets).clamp(max=self.max_len - 1)  # [B, W]
        last = m - 1 - start  # [B] index of position m_b - 1 in the window
        return positions, last, attend


class DeepSeekDrafter(Drafter):
    """Chains the D modules: module k at position i reads hᵏ⁻¹ᵢ and Emb(t_{i+k}). Entries whose
    t_{i+k} is final are kept; the last k-1 entries of module k used drafts and are redone on the
    next round (its cache length stops before them: that is the rollback)."""

    def __init__(self, *args):
        super().__init__(*args)
        mods = self.model.tail.objective.layers
        d = self.model.config.model.hidden_size
        self.caches = self._block_caches(m.block for m in mods)
        self.hidden = [torch.zeros(self.batch, self.max_len, d, dtype=self.dtype,
                                   device=self.device) for _ in mods]
        self.valid = [torch.zeros(self.batch, dtype=torch.long, device=self.device) for _ in mods]

    def catch_up(self, tokens, trunk, normed, m):
        drafts, probs = [], []
        prev_hidden = normed  # h⁰: the final-norm output
        for k, module in enumerate(self.model.tail.objective.layers, start=1):
            # Module k's cache stops k - 1 positions before the previous m, and a round moves m
            # by at most D + 1: the window is at most D + k wide.
            positions, last, attend = self._window(self.valid[k - 1], m, self.depth + k)
            h_in = _rows(prev_hidden, positions)  # [B, W, d]
            future = tokens.gather(1, (positions + k).clamp(max=tokens.shape[1] - 1))  # t_{i+k}
            h = module(h_in, self.model.embedding(future),
                       self.caches[k - 1].layer(0, positions, attend))  # [B, W, d]
            _put_rows(self.hidden[k - 1], positions, h)
            h_last = h[torch.arange(h.shape[0], device=self.device), last]  # [B, d]
            tok, p = self._pick(self.model.embedding.logits(module.out_norm(h_last)))
            tokens[torch.arange(tokens.shape[0], device=self.device), m + k] = tok
            drafts.append(tok)
            probs.append(p)
            self.valid[k - 1].copy_((m - k + 1).clamp(min=0))
            prev_hidden = self.hidden[k - 1]
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs[0] is not None else None)


class ParallelHeadsDrafter(Drafter):
    """Meta's heads: head j (a transformer block with its own cache over the trunk outputs) at the
    last position drafts t_{m+j}; no dependence on drafted tokens, so nothing to roll back."""

    def __init__(self, *args):
        super().__init__(*args)
        self.caches = self._block_caches(self.model.tail.objective.heads)
        self.valid = torch.zeros(self.batch, dtype=torch.long, device=self.device)

    def catch_up(self, tokens, trunk, normed, m):
        positions, last, attend = self._window(self.valid, m, self.depth + 1)
        h_in = _rows(trunk, positions)
        rows = torch.arange(h_in.shape[0], device=self.device)
        drafts, probs = [], []
        for j, head in enumerate(self.model.tail.objective.heads):
            h = head(h_in, self.caches[j].layer(0, positions, attend))
            logits = self.model.embedding.logits(self.model.tail.final_norm(h[rows, last]))
            tok, p = self._pick(logits)
            drafts.append(tok)
            probs.append(p)
        self.valid.copy_(m)
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs[0] is not None else None)


class BlockwiseDrafter(Drafter):
    """BPD heads: hⱼ = z + FFNⱼ(z) at the last position; stateless."""

    def catch_up(self, tokens, trunk, normed, m):
        rows = torch.arange(normed.shape[0], device=self.device)
        z = normed[rows, m - 1]  # [B, d]
        drafts, probs = [], []
        for head in self.model.tail.objective.heads:
            tok, p = self._pick(self.model.embedding.logits(z + head(z)))
            drafts.append(tok)
            probs.append(p)
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs[0] is not None else None)


DRAFTERS = {"deepseek": DeepSeekDrafter, "parallel": ParallelHeadsDrafter,
            "blockwise": BlockwiseDrafter}
