"""Self-speculative decoding: the MTP tail drafts D tokens, one main-model forward verifies them
all, the longest agreeing prefix is kept (plus the main model's own next token).

Greedy: a draft is accepted iff it equals the main model's argmax (or, with `topk` > 1, lies in
its top k — BPD's relaxation, no longer identical to greedy). The output is token-identical to
plain greedy decoding. Sampling: speculative rejection sampling (accept d with probability
min(1, p(d)/q(d)), else resample from max(p − q, 0)), so outputs follow the main model's
(temperature/top-p) distribution exactly.

For parallel and blockwise heads the verification forward also yields the next drafts' inputs
(the trunk output at the last accepted position): Stern et al.'s predict–verify overlap, with no
extra pass of the trunk. DeepSeek's modules run once per round on the newly final positions.
"""

from __future__ import annotations

import time

import torch

from model import accelerator
from model.generation.runner import (
    check_fits,
    done,
    finish,
    main_forward,
    new_cache,
    pad_prompts,
)
from model.generation.sampling import GREEDY, SamplingConfig, probabilities
from model.generation.stats import GenerationResult, SpeculativeStats
from model.mtp.objective import NO_MTP, objective_class
from model.transformer import MTPLanguageModel


def _accept_greedy(main_logits: torch.Tensor, drafts: torch.Tensor, topk: int):
    """main_logits [B, D+1, V], drafts [B, D] → accepted count [B], the main model's token at
    the first rejected position (or after the last draft) [B]."""
    best = main_logits.argmax(dim=-1)  # [B, D+1]
    if topk <= 1:
        ok = best[:, :-1] == drafts
    else:
        top = main_logits[:, :-1].topk(topk, dim=-1).indices  # [B, D, k]
        ok = (top == drafts[..., None]).any(dim=-1)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def _accept_sampled(main_logits, drafts, draft_probs, sampling, generator):
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023), on the CPU with
    the seeded generator: accept draft j with probability min(1, p(d)/q(d)); at the first
    rejection sample from max(p − q, 0) renormalised; after D acceptances sample from p."""
    p = probabilities(main_logits.cpu(), sampling)  # [B, D+1, V]
    q = draft_probs  # [B, D, V]
    d = drafts.cpu()
    b, depth = d.shape
    p_d = p[:, :-1].gather(2, d[..., None]).squeeze(2)  # [B, D]
    q_d = q.gather(2, d[..., None]).squeeze(2)
    u = torch.rand(b, depth, generator=generator)
    ok = u * q_d <= p_d  # u < p/q without dividing by a possibly-zero q
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    rows = torch.arange(b)
    p_a = p[rows, accepted]  # [B, V]: the target at the first unaccepted position
    q_a = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)[rows, accepted]  # 0 after D drafts
    residual = (p_a - q_a).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q exactly leaves no residual mass; rejection then has probability 0, keep p.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)
    nxt = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return accepted.to(drafts.device), nxt.to(drafts.device)


class SpeculativeDecoder:
    """The decoding state of a batch: tokens, the main model's cache and hidden-state history,
    the drafter (with its own caches). `prefill()`, then `step()` until `finished`."""

    def __init__(self, model: MTPLanguageModel, prompts: list[list[int]], max_new_tokens: int,
                 sampling: SamplingConfig = GREEDY, eos_id: int | None = None,
                 pad_id: int = 0, topk: int = 1, graphs: bool | None = None,
                 static: bool = False):
        """`graphs`: capture each greedy round as a device graph after the first (None: on
        GPUs at TP = 1). `static`: run greedy rounds with the fixed shapes that capture needs
        even without graphs (how the CPU tests check the graphed path's arithmetic)."""
        kind, depth = model.config.mtp.kind, model.config.mtp.depth
        if kind == NO_MTP:
            raise ValueError("self-speculative decoding needs an MTP tail; this model has "
                             "mtp.kind 'none' (use plain generation)")
        sampling.validate()
        if topk < 1 or (topk > 1 and not sampling.greedy):
            raise ValueError(f"topk = {topk}: the top-k acceptance relaxation applies to greedy "
                             "decoding only, with k >= 1")
        self.model, self.depth, self.sampling, self.topk = model, depth, sampling, topk
        self.max_new, self.eos_id = max_new_tokens, eos_id
        self.device = device = model.embedding.output_weight.device
        self.prompt_tokens, self.lengths = pad_prompts(prompts, pad_id, device)
        b, width = self.prompt_tokens.shape
        self.max_len = check_fits(width, max_new_tokens, model.config.model.max_seq_len, depth)
        self.gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        dtype = model.embedding.output_weight.dtype
        self.tokens = torch.full((b, self.max_len), pad_id, dtype=torch.long, device=device)
        self.tokens[:, :width] = self.prompt_tokens
        self.trunk = torch.zeros(b, self.max_len, model.config.model.hidden_size, dtype=dtype,
                                 device=device)
        self.normed = torch.zeros_like(self.trunk)
        self.cache = new_cache(model, len(model.blocks), b, self.max_len, device)
        self.drafter = objective_class(kind).drafter(model, b, self.max_len, sampling, self.gen)
        self.rows = torch.arange(b, device=device)
        self.stats = SpeculativeStats(depth)
        self.generated: list[list[int]] = [[] for _ in range(b)]
        self.m = self.lengths.clone()  # [B] index of the newest token (not yet in the cache)
        self.offsets = torch.arange(depth + 1, device=device)
        self.out = torch.zeros(b, depth + 2, dtype=torch.long, device=device)
        self.active = torch.ones(b, dtype=torch.long, device=device)
        self.graphs = graphs if graphs is not None else (
            accelerator.graphs_supported() and model.embedding.tp_group.size() == 1)
        self.static = static
        self.rounds = 0
        self._replay = None

    @property
    def finished(self) -> bool:
        return all(done(self.generated, self.max_new, self.eos_id))

    def prefill(self) -> None:
        """Positions 0..P-1; the main model's first token lands at index m = prompt length."""
        model, rows = self.model, self.rows
        b, width = self.prompt_tokens.shape
        positions = torch.arange(width, device=self.device).expand(b, width)
        h = main_forward(model, self.cache, self.prompt_tokens, positions, width)
        z = model.tail.final_norm(h)
        self.trunk[:, :width], self.normed[:, :width] = h, z
        logits = model.embedding.logits(z[rows, self.lengths - 1])  # [B, V]
        if self.sampling.greedy:
            first = logits.argmax(-1)
        else:
            first = torch.multinomial(probabilities(logits.cpu(), self.sampling), 1,
                                      generator=self.gen).squeeze(1).to(self.device)
        self.tokens[rows, self.m] = first
        self.generated = [[t] for t in first.tolist()]

    def step(self) -> None:
        """One round: draft D tokens, verify them in one main-model forward, keep the agreeing
        prefix; then the host-side bookkeeping (one device-to-host copy)."""
        # The first round catches the drafter up on the whole prompt (a window of any width);
        # after it every round has the same shapes.
        static = self.rounds > 0 and self.sampling.greedy and (self.graphs or self.static)
        self.drafter.static = static
        if static and self.graphs:
            if self._replay is None:
                self._replay = accelerator.graph_replayer(self._round)  # runs this round
            else:
                self._replay()
        else:
            self._round(static)
        self.rounds += 1
        self._record_round()

    def _round(self, static: bool = True) -> None:
        """The device part of a round. Reads the state (tokens, trunk, normed, caches, m) and
        updates it in place; writes [accepted, next token, drafts] per sequence to `self.out`.
        `static`: whole-cache attention, so no host synchronisation (graph capture)."""
        model, rows, depth, m = self.model, self.rows, self.depth, self.m
        drafts, draft_probs = self.drafter.catch_up(self.tokens, self.trunk, self.normed, m)
        block = torch.cat((self.tokens[rows, m][:, None], drafts), dim=1)  # [B, D+1]
        positions = m[:, None] + self.offsets  # [B, D+1]
        attend = self.max_len if static else int(m.max()) + depth + 1
        h = main_forward(model, self.cache, block, positions, attend)
        z = model.tail.final_norm(h)
        logits = model.embedding.logits(z)  # [B, D+1, V]
        if self.sampling.greedy:
            accepted, nxt = _accept_greedy(logits, drafts, self.topk)
        else:
            accepted, nxt = _accept_sampled(logits, drafts, draft_probs, self.sampling, self.gen)
        self.trunk.scatter_(1, positions[..., None].expand_as(h), h)
        self.normed.scatter_(1, positions[..., None].expand_as(z), z)
        # Final tokens: the accepted drafts, then the main model's token; the rest is stale.
        keep = self.offsets[None, :-1] < accepted[:, None]  # [B, D]
        new = torch.where(keep, drafts, self.tokens[rows[:, None], positions[:, 1:]])
        self.tokens.scatter_(1, positions[:, 1:], new)
        self.tokens[rows, m + accepted + 1] = nxt
        # The main cache now holds positions ≤ m + D; those past m + accepted are stale and get
        # overwritten before any query can reach them: that is the rollback.
        self.out.copy_(torch.cat((accepted[:, None], nxt[:, None], drafts), dim=1))

    def _record_round(self) -> None:
        depth = self.depth
        out = self.out.tolist()  # the round's only device-to-host copy
        active = [not f for f in done(self.generated, self.max_new, self.eos_id)]
        for i, is_active in enumerate(active):
            if not is_active:
                continue
            a, nxt, drafts = out[i][0], out[i][1], out[i][2:]
            self.generated[i] += drafts[:a] + [nxt]
            self.stats.main_forwards += 1
            self.stats.tokens += a + 1
            for j in range(depth):
                self.stats.proposed[j] += 1
                self.stats.accepted[j] += int(j < a)
        # Finished sequences stay where they are (their later rounds are computed and dropped).
        self.active.copy_(torch.tensor(active))
        self.m.add_((self.out[:, 0] + 1) * self.active)

    def result(self, seconds: float) -> GenerationResult:
        return GenerationResult(finish(self.generated, self.max_new, self.eos_id), seconds,
                                self.stats)


@torch.no_grad()
def generate_speculative(model: MTPLanguageModel, prompts: list[list[int]], max_new_tokens: int,
                         sampling: SamplingConfig = GREEDY, eos_id: int | None = None,
                         pad_id: int = 0, topk: int = 1, graphs: bool | None = None,
                         static: bool = False) -> GenerationResult:
    t0 = time.perf_counter()
    dec = SpeculativeDecoder(model, prompts, max_new_tokens, sampling, eos_id, pad_id, topk,
                             graphs, static)
    dec.prefill()
    while not dec.finished:
        dec.step()
    return dec.result(time.perf_counter() - t0)
