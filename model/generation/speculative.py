"""Self-speculative decoding: the MTP tail drafts N tokens (its depth D, unless asked for fewer,
or for more from a tail whose last depth can be chained), one main-model forward verifies them
all, the longest agreeing prefix is kept (plus the main model's own next token).

Greedy: a draft is accepted iff it equals the main model's argmax (or, with `topk` > 1, lies in
its top k — BPD's relaxation, no longer identical to greedy). The output is token-identical to
plain greedy decoding. Sampling: speculative rejection sampling (accept d with probability
min(1, p(d)/q(d)), else resample from max(p − q, 0)), so outputs follow the main model's
(temperature/top-p) distribution exactly.

A round verifies the drafts it is given, commits what it accepts and then drafts for the next
round (`Drafter.catch_up`): for parallel and blockwise heads the verification forward already
yields the next drafts' inputs (Stern et al.'s predict–verify overlap, no extra pass of the
trunk); DeepSeek's modules run once per round on the newly final positions. The prefill drafts
for the first round, so every round has the same shapes: the engine captures the prefill (per
prompt bucket) and the round once each and replays them. Acceptance, the cache commit, EOS and
the statistics are all computed on the device; the host reads one small tensor per round.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from model.generation.draft_vocab import DraftVocabulary
from model.generation.drafters import put_rows
from model.generation.runner import Slot, main_forward
from model.generation.sampling import Sampler
from model.generation.stats import SpeculativeStats
from model.mtp.objective import NO_MTP, objective_class
from model.transformer import MTPLanguageModel


def _accept_greedy(main_logits: torch.Tensor, drafts: torch.Tensor, topk: int):
    """main_logits [B, N+1, V], drafts [B, N] → accepted count [B], the main model's token at
    the first rejected position (or after the last draft) [B]."""
    best = main_logits.argmax(dim=-1)  # [B, N+1]
    if topk <= 1:
        ok = best[:, :-1] == drafts
    else:
        top = main_logits[:, :-1].topk(topk, dim=-1).indices  # [B, N, k]
        ok = (top == drafts[..., None]).any(dim=-1)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def _accept_sampled(main_logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor,
                    sampler: Sampler):
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023) with the
    request's device generator: accept draft j with probability min(1, p(d)/q(d)); at the first
    rejection sample from max(p − q, 0) (renormalised: `sample` draws from unnormalised rows);
    after N acceptances sample from p."""
    p = sampler.probabilities(main_logits)  # [B, N+1, V]
    q = draft_probs  # [B, N, V]
    p_d = p[:, :-1].gather(2, drafts[..., None]).squeeze(2)  # [B, N]
    q_d = q.gather(2, drafts[..., None]).squeeze(2)
    u = sampler.uniform(p_d.shape[1])  # [B, N]
    ok = u * q_d <= p_d  # u < p/q without dividing by a possibly-zero q
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    p_a = p.gather(1, at).squeeze(1)  # [B, V]: the target at the first unaccepted position
    q_a = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1).gather(1, at).squeeze(1)  # 0 after N
    residual = (p_a - q_a).clamp(min=0)
    # p == q exactly leaves no residual mass; rejection then has probability 0, keep p.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
    return accepted, sampler.sample(residual)


class SpeculativeDecoder:
    """Self-speculative decoding of the sequences in a slot: the main model's hidden-state
    history, the drafter (with its own caches), the pending drafts and the statistics. The
    engine calls (or replays) `prefill` once per request and `round` until no sequence is
    active."""

    def __init__(self, model: MTPLanguageModel, slot: Slot, compiled: bool = False,
                 vocab: DraftVocabulary | None = None, draft_tokens: int | None = None):
        """`compiled`: run a round's work besides the main model's blocks — acceptance and
        commit, and the drafter's catch-up — as compiled regions (the blocks inside the
        catch-up are inlined into it). The prefill's catch-up (a prompt-wide window, once per
        request) stays eager. `vocab`: draft over these tokens only (None: all).
        `draft_tokens`: drafts per round (None: the tail's depth)."""
        kind = model.config.mtp.kind
        if kind == NO_MTP:
            raise ValueError("self-speculative decoding needs an MTP tail; this model has "
                             "mtp.kind 'none' (use plain generation)")
        self.model, self.slot = model, slot
        b, length, device = slot.batch, slot.max_len, slot.device
        d = model.config.model.hidden_size
        dtype = model.embedding.output_weight.dtype
        self.trunk = torch.zeros(b, length, d, dtype=dtype, device=device)
        self.normed = torch.zeros_like(self.trunk)
        self.drafter = objective_class(kind).drafter(model, b, length, draft_tokens)
        self.drafter.vocab = vocab
        self.n = n = self.drafter.drafts
        """N: drafts per round."""
        self.drafts = torch.zeros(b, n, dtype=torch.long, device=device)
        self.draft_probs: torch.Tensor | None = None  # [B, N, V] fp32, when sampling
        self.offsets = torch.arange(n + 1, device=device)
        self.rounds_by_accepted = torch.zeros(b, n + 2, dtype=torch.long, device=device)
        """Per sequence: rounds that accepted a = 0..N drafts while it was active; the last
        column counts its inactive rounds (dropped). Every statistic follows from it."""
        self.ones = torch.ones(b, dtype=torch.long, device=device)
        self._commit = torch.compile(self._accept_and_commit, dynamic=True) if compiled else \
            self._accept_and_commit
        self._catch_up = torch.compile(self.drafter.catch_up, dynamic=True) if compiled else \
            self.drafter.catch_up

    def _draft(self, sampler: Sampler) -> None:
        s = self.slot
        self.drafter.sampler = sampler
        catch_up = self.drafter.catch_up if self.drafter.prompt_width else self._catch_up
        drafts, probs = catch_up(s.tokens, self.trunk, self.normed, s.m)
        self.drafts.copy_(drafts)
        if probs is not None:
            if self.draft_probs is None:  # first sampled use; never inside a capture (a
                self.draft_probs = torch.empty_like(probs)  # phase runs once before it)
            self.draft_probs.copy_(probs)

    def prefill(self, width: int, sampler: Sampler, check_eos: bool) -> None:
        """Positions 0..width-1; the main model's first token lands at index m = prompt
        length; the drafter catches up on the whole prompt and drafts for the first round."""
        s, model = self.slot, self.model
        with record_function("decode.prefill"):
            s.start()
            sampler.draw()
            h = main_forward(model, s.cache, s.tokens[:, :width], s.positions[:, :width], width)
            z = model.tail.final_norm(h)
            self.trunk[:, :width], self.normed[:, :width] = h, z
            first, _ = sampler.pick(model.embedding.logits(z[s.rows, s.m - 1]))  # [B]
            s.tokens[s.rows, s.m] = first
            s.finish_step(first == s.eos if check_eos else None)
            self.rounds_by_accepted.zero_()
            self.drafter.prompt_width = width
            try:
                self._draft(sampler)
            finally:
                self.drafter.prompt_width = 0

    def round(self, sampler: Sampler, check_eos: bool, topk: int = 1) -> None:
        """Verify the pending drafts in one main-model forward, commit the accepted prefix and
        the main model's next token, then draft for the next round."""
        s, m = self.slot, self.slot.m
        sampler.draw()
        with record_function("decode.main"):  # profiler ranges (benchmarks/bench_generation.py)
            block = torch.cat((s.tokens.gather(1, m[:, None]), self.drafts), dim=1)  # [B, N+1]
            positions = m[:, None] + self.offsets  # [B, N+1]
            h = main_forward(self.model, s.cache, block, positions, s.max_len)
        with record_function("decode.commit"):
            self._commit(h, positions, sampler, check_eos, topk)
        with record_function("decode.draft"):
            self._draft(sampler)

    def _accept_and_commit(self, h: torch.Tensor, positions: torch.Tensor, sampler: Sampler,
                           check_eos: bool, topk: int) -> None:
        s, model, n, m, drafts = self.slot, self.model, self.n, self.slot.m, self.drafts
        z = model.tail.final_norm(h)
        logits = model.embedding.logits(z)  # [B, N+1, V]
        if sampler.greedy:
            accepted, nxt = _accept_greedy(logits, drafts, topk)
        else:
            accepted, nxt = _accept_sampled(logits, drafts, self.draft_probs, sampler)
        put_rows(self.trunk, positions, h)
        put_rows(self.normed, positions, z)
        # Final tokens: the accepted drafts, then the main model's token; what lies after it is
        # stale and overwritten before it counts. The main cache now holds positions ≤ m + N;
        # those past m + accepted are stale too and overwritten before any query reaches them:
        # that is the rollback.
        # (Indexed assignments, not scatters: compiled, they write in place; see put_rows.)
        s.tokens[s.rows[:, None], positions[:, 1:]] = drafts
        s.tokens[s.rows, m + accepted + 1] = nxt
        column = torch.where(s.active.bool(), accepted, n + 1)
        self.rounds_by_accepted.index_put_((s.rows, column), self.ones, accumulate=True)
        eos_hit = None
        if check_eos:
            fresh = s.tokens.gather(1, positions + 1)  # [B, N+1]: m+1 .. m+N+1
            eos_hit = ((fresh == s.eos[:, None]) & (self.offsets <= accepted[:, None])).any(1)
        m.add_((accepted + 1) * s.active)
        s.finish_step(eos_hit)

    def stats(self, rounds_by_accepted: torch.Tensor) -> SpeculativeStats:
        """The statistics of the request's sequences from a host copy of their rows of
        `rounds_by_accepted`."""
        per_a = rounds_by_accepted[:, : self.n + 1].sum(dim=0).tolist()  # rounds by a
        st = SpeculativeStats(self.n)
        st.main_forwards = sum(per_a)
        st.tokens = sum((a + 1) * n for a, n in enumerate(per_a))
        st.proposed = [st.main_forwards] * self.n
        st.accepted = [sum(per_a[j + 1:]) for j in range(self.n)]
        return st
