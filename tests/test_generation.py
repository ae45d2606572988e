"""KV-cache generation and self-speculative decoding (CPU)."""

from __future__ import annotations

import pytest
import torch

from model import MTPLanguageModel, single_process_context
from model.generation import generate, generate_speculative
from model.generation.runner import main_forward, new_cache
from model.generation.sampling import SamplingConfig
from model.generation.speculative import SpeculativeDecoder
from tests.generation_fixtures import prompts_from_chain, trained_model
from tests.model_fixtures import KINDS, randomize_, tiny_config


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_speculative_equals_plain_greedy(kind, depth):
    model = trained_model(kind, depth)
    for prompts in (prompts_from_chain(1), prompts_from_chain(5)):  # batch 1 and ragged batch 5
        plain = generate(model, prompts, 30)
        spec = generate_speculative(model, prompts, 30)
        assert spec.tokens == plain.tokens
        assert all(len(t) == 30 for t in spec.tokens)
        # The fixed-shape rounds that GPUs capture as graphs (whole-cache attention, fixed
        # drafter windows) decode the same tokens with the same statistics.
        assert generate(model, prompts, 30, static=True).tokens == plain.tokens
        static = generate_speculative(model, prompts, 30, static=True)
        assert static.tokens == plain.tokens
        assert static.stats.accepted == spec.stats.accepted
    st = spec.stats
    # Drafts were accepted and rejected: both the fast path and the rollback ran.
    assert 1.1 < st.mean_tokens_per_forward() < depth + 1
    assert 0 < st.accepted[0] < st.proposed[0]


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_models_too(kind):
    torch.manual_seed(0)
    model = MTPLanguageModel(tiny_config(kind, 2, max_seq_len=96), single_process_context(), seed=5)
    randomize_(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    assert generate_speculative(model, prompts, 20).tokens == generate(model, prompts, 20).tokens


def test_eos_stops_each_sequence():
    model = trained_model("deepseek", 2)
    prompts = prompts_from_chain(4)
    ref = generate(model, prompts, 30)
    eos = ref.tokens[0][5]  # a token that occurs: sequences must stop right after it
    plain = generate(model, prompts, 30, eos_id=eos)
    spec = generate_speculative(model, prompts, 30, eos_id=eos)
    assert spec.tokens == plain.tokens
    assert generate(model, prompts, 30, eos_id=eos, static=True).tokens == plain.tokens
    assert generate_speculative(model, prompts, 30, eos_id=eos, static=True).tokens == plain.tokens
    assert plain.tokens[0][-1] == eos and len(plain.tokens[0]) <= 6


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kind", ["deepseek", "parallel"])
def test_rolled_back_caches_equal_a_fresh_prefill(kind, static):
    model = trained_model(kind, 3)
    prompts = prompts_from_chain(3)
    dec = SpeculativeDecoder(model, prompts, 40, static=static)
    dec.prefill()
    for _ in range(6):
        dec.step()
    assert dec.stats.accepted[2] < dec.stats.proposed[2]  # there were rejections
    # The drafter catches up at the start of a step: do that now, as the next step would.
    dec.drafter.catch_up(dec.tokens, dec.trunk, dec.normed, dec.m)
    for b in range(len(prompts)):
        m = int(dec.m[b])
        # Main model: cache positions [0, m) equal a fresh prefill of the final tokens.
        fresh = new_cache(model, len(model.blocks), 1, m, dec.device)
        toks = dec.tokens[b : b + 1, :m]
        main_forward(model, fresh, toks, torch.arange(m)[None], m)
        for layer in range(len(model.blocks)):
            torch.testing.assert_close(dec.cache.keys[layer][b, :, :m], fresh.keys[layer][0],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dec.cache.values[layer][b, :, :m], fresh.values[layer][0],
                                       rtol=1e-4, atol=1e-5)
        # The drafter's caches: a fresh decoder over the final tokens catches up from scratch.
        ref = SpeculativeDecoder(model, [dec.tokens[b, : m + 1].tolist()[:-1]], 5)
        ref.prefill()
        ref.tokens[0, m] = dec.tokens[b, m]
        ref.drafter.catch_up(ref.tokens, ref.trunk, ref.normed, torch.tensor([m]))
        for k, (mine, theirs) in enumerate(zip(dec.drafter.caches, ref.drafter.caches), start=1):
            valid = m - k + 1 if kind == "deepseek" else m
            torch.testing.assert_close(mine.keys[0][b, :, :valid], theirs.keys[0][0, :, :valid],
                                       rtol=1e-4, atol=1e-5)


def test_topk_relaxation_accepts_more_and_all_with_k_equal_vocab():
    model = trained_model("blockwise", 3)
    prompts = prompts_from_chain(3)
    exact = generate_speculative(model, prompts, 24)
    loose = generate_speculative(model, prompts, 24, topk=model.config.model.vocab_size)
    assert loose.stats.mean_tokens_per_forward() == pytest.approx(4.0, abs=0.2)
    assert loose.stats.accepted == loose.stats.proposed
    assert exact.stats.mean_tokens_per_forward() < loose.stats.mean_tokens_per_forward()


def test_bad_requests_are_refused():
    model = trained_model("deepseek", 1)
    with pytest.raises(ValueError, match="temperature = -1"):
        generate(model, [[1]], 5, SamplingConfig(temperature=-1))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len = 96"):
        generate_speculative(model, [[1] * 80], 30)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 5)
    with pytest.raises(ValueError, match="greedy decoding only"):
        generate_speculative(model, [[1]], 5, SamplingConfig(temperature=1.0), topk=3)
    none = MTPLanguageModel(tiny_config("none"), single_process_context())
    with pytest.raises(ValueError, match="needs an MTP tail"):
        generate_speculative(none, [[1]], 5)
