"""Speculative sampling reproduces the main model's (temperature, top-p) distribution.

A tiny vocabulary (8 tokens) makes the exact distribution of the first three generated tokens
computable by enumeration (512 outcomes); 8,192 samples from one batched request (a power of
two: no padded rows in the engine's batch bucket) are compared with it by a chi-square test.
The same test on a broken sampler (drafts always accepted) must fail, so the test can tell.
Sampling runs on the device with the engine's generator (on the CPU here), as GPUs replay it
from captured graphs."""

from __future__ import annotations

import itertools

import pytest
import torch

import model.generation.speculative as spec
from model import MTPLanguageModel, single_process_context
from model.generation import generate, generate_speculative
from model.generation.sampling import SamplingConfig, probabilities
from tests.model_fixtures import randomize_, tiny_config

N = 8_192
PROMPT = [3, 1, 4]
SAMPLING = SamplingConfig(temperature=1.3, top_p=0.9, seed=5)


def _model(kind, depth=2):
    torch.manual_seed(0)
    m = MTPLanguageModel(tiny_config(kind, depth, vocab_size=8, max_seq_len=32), single_process_context(), seed=2)
    randomize_(m, seed=4)
    with torch.no_grad():  # sharpen the tiny model so the distributions are far from uniform
        m.embedding.head_weight.mul_(8.0)
    return m.eval()


@torch.no_grad()
def _exact(model) -> torch.Tensor:
    """p(t1, t2, t3 | prompt) [8, 8, 8] under the filtered sampling distribution."""
    v = 8
    seqs = torch.tensor([PROMPT + list(t) for t in itertools.product(range(v), repeat=2)])
    logits = model.main_logits(seqs)  # [64, P+2, V]
    p = probabilities(logits, SAMPLING)
    p1 = p[0, len(PROMPT) - 1]  # [V]
    p2 = p[:, len(PROMPT)].view(v, v, v)[:, 0]  # p(t2 | t1): rows t1 (t2 column irrelevant)
    p3 = p[:, len(PROMPT) + 1].view(v, v, v)  # p(t3 | t1, t2)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square(samples: list[list[int]], exact: torch.Tensor) -> tuple[float, int]:
    counts = torch.zeros(512)
    for s in samples:
        counts[s[0] * 64 + s[1] * 8 + s[2]] += 1
    expected = exact.flatten() * len(samples)
    big = expected >= 5  # pool the rare outcomes into one bin
    obs, exp = counts[big], expected[big]
    if expected[~big].sum() > 0:
        obs = torch.cat((obs, counts[~big].sum()[None]))
        exp = torch.cat((exp, expected[~big].sum()[None]))
    return float(((obs - exp) ** 2 / exp).sum()), int(obs.numel() - 1)


def _critical(df: int) -> float:
    # Wilson–Hilferty approximation of the chi-square quantile at p = 0.999 (z = 3.09).
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deepseek", "parallel"])
def test_speculative_sampling_matches_the_main_distribution(kind, monkeypatch):
    model = _model(kind)
    exact = _exact(model)
    assert abs(float(exact.sum()) - 1) < 1e-5
    out = generate_speculative(model, [PROMPT] * N, 3, SAMPLING)
    chi2, df = _chi_square(out.tokens, exact)
    assert df > 30  # enough distinct outcomes for the test to mean something
    assert chi2 < _critical(df), f"chi2 {chi2:.1f} with {df} degrees of freedom"
    # Plain sampling passes the same test (a check of the test itself)...
    plain = generate(model, [PROMPT] * N, 3, SAMPLING)
    assert _chi_square(plain.tokens, exact)[0] < _critical(df)
    # ...and a sampler that keeps every draft fails it.
    def accept_all(main_logits, drafts, draft_probs, sampler):
        acc, nxt = spec._accept_greedy(main_logits, drafts, 1)
        return torch.full_like(acc, drafts.shape[1]), nxt

    monkeypatch.setattr(spec, "_accept_sampled", accept_all)
    broken = generate_speculative(model, [PROMPT] * N, 3, SAMPLING)
    assert _chi_square(broken.tokens, exact)[0] > 3 * _critical(df)


@pytest.mark.slow
def test_speculative_sampling_with_a_reduced_draft_vocabulary_matches_too():
    """Drafts over 4 of the 8 tokens (q is zero on the others): still the main distribution."""
    from model.generation import DecodingEngine

    model = _model("deepseek")
    exact = _exact(model)
    engine = DecodingEngine(model, compile=False, draft_vocab=torch.tensor([0, 2, 5, 7]))
    out = engine.generate([PROMPT] * N, 3, SAMPLING, speculative=True)
    chi2, df = _chi_square(out.tokens, exact)
    assert df > 30 and chi2 < _critical(df), f"chi2 {chi2:.1f} with {df} degrees of freedom"
    assert 0 < out.stats.accepted[0] < out.stats.proposed[0]


@pytest.mark.slow
def test_speculative_sampling_with_chained_drafts_matches_too():
    """D = 1 drafting 3 tokens a round: the second generated token is the module's draft, the
    third the module chained once (its own distribution q); still the main distribution."""
    from model.generation import DecodingEngine

    model = _model("deepseek", depth=1)
    exact = _exact(model)
    engine = DecodingEngine(model, compile=False, draft_tokens=3)
    out = engine.generate([PROMPT] * N, 3, SAMPLING, speculative=True)
    chi2, df = _chi_square(out.tokens, exact)
    assert df > 30 and chi2 < _critical(df), f"chi2 {chi2:.1f} with {df} degrees of freedom"
    assert 0 < out.stats.accepted[1] < out.stats.proposed[1]  # the chained draft: kept at times
