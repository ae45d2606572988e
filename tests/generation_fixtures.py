"""Tiny models trained in-process on a noisy Markov chain (their drafts are then right), with the
MTP weights perturbed afterwards so that drafts are often but not always right: speculative
decoding then accepts, rejects and rolls back for real."""

from __future__ import annotations

import functools

import torch

from model import MTPLanguageModel, single_process_context
from tests.model_fixtures import tiny_config

# Perturbation of the MTP weights (× their std) giving partial acceptance for each kind.
DRAFT_NOISE = {"deepseek": 1.5, "parallel": 0.7, "blockwise": 0.7}


def markov_batch(g: torch.Generator, batch: int, length: int, vocab: int, noise: float):
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(123))
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for i in range(1, length):
        rnd = torch.randint(0, vocab, (batch,), generator=g)
        follow = torch.rand(batch, generator=g) >= noise
        seq[:, i] = torch.where(follow, perm[seq[:, i - 1]], rnd)
    return seq


@functools.cache
def trained_model(kind: str, depth: int, steps: int = 40, noise: float = 0.15,
                  draft_noise: float | None = None) -> MTPLanguageModel:
    torch.manual_seed(0)
    dcfg = tiny_config(kind, depth, max_seq_len=96)
    model = MTPLanguageModel(dcfg, single_process_context(), seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(7)
    vocab, t = dcfg.model.vocab_size, 24
    for _ in range(steps):
        w = markov_batch(g, 16, t + depth + 1, vocab, noise)
        labels = torch.stack([w[:, 1 + j: t + 1 + j] for j in range(depth + 1)], dim=1)
        out = model(w[:, :t], labels, None, mtp_weight=1.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():  # degrade the drafts only: the main model stays as trained
        g = torch.Generator().manual_seed(99)
        for p in model.tail.objective.parameters():
            p.add_((draft_noise if draft_noise is not None else DRAFT_NOISE[kind]) * p.std() * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def prompts_from_chain(n: int, seed: int = 11) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    seqs = markov_batch(g, n, 12, 96, 0.15)
    return [seqs[i, : 3 + 4 * (i % 3)].tolist() for i in range(n)]  # lengths 3, 7, 11, …
