"""The decoding engine: KV-cache generation and self-speculative decoding, one engine serving a
sequence of requests (CPU; the eager run of the same static phases that GPUs capture)."""

from __future__ import annotations

import pytest
import torch

from model import MTPLanguageModel, accelerator, single_process_context
from model.generation import DecodingEngine, SamplingConfig, generate, generate_speculative
from model.generation.runner import Slot, main_forward, new_cache
from model.generation.sampling import GREEDY_MODE, Sampler
from model.generation.speculative import SpeculativeDecoder
from tests.distributed import run_world
from tests.generation_fixtures import prompts_from_chain, trained_model
from tests.model_fixtures import KINDS, randomize_, tiny_config


@torch.no_grad()
def _reference_greedy(model, prompts, n):
    """Greedy decoding by recomputing the whole sequence each token, without any cache (the
    training forward): independent of the engine's cache, masks and rotary tables."""
    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            seq.append(int(model.main_logits(torch.tensor([seq]))[0, -1].argmax()))
        out.append(seq[len(p):])
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_speculative_equals_plain_greedy(kind, depth):
    model = trained_model(kind, depth)
    engine = DecodingEngine(model)
    for prompts in (prompts_from_chain(1), prompts_from_chain(5)):  # batch 1 and ragged batch 5
        plain = engine.generate(prompts, 30)
        spec = engine.generate(prompts, 30, speculative=True)
        if depth == 1:  # the main model's decoding itself, once per objective
            assert plain.tokens == _reference_greedy(model, prompts, 30)
        assert spec.tokens == plain.tokens
        assert all(len(t) == 30 for t in spec.tokens)
    st = spec.stats
    # Drafts were accepted and rejected: both the fast path and the rollback ran.
    assert 1.1 < st.mean_tokens_per_forward() < depth + 1
    assert 0 < st.accepted[0] < st.proposed[0]
    # Per sequence: the prefill's token, then rounds of 1..D+1 tokens up to (or past) 30.
    assert 5 * 29 <= st.tokens <= 5 * (29 + depth)


# (prompts, max_new_tokens, speculative, sampling): batch buckets 4, 1, 8 and 4 again; cache
# buckets 16, 64 and 96; prompt buckets of 8 and 16. The fourth request reuses the first's slot
# after a longer one, the sampled ones replay the greedy ones' slots in another mode.
REQUESTS = [
    (prompts_from_chain(3), 40, True, None),
    (prompts_from_chain(1, seed=3), 12, False, None),
    (prompts_from_chain(6, seed=2), 25, True, None),
    (prompts_from_chain(4, seed=5), 20, True, None),
    (prompts_from_chain(3, seed=7), 30, False, SamplingConfig(temperature=0.9, top_p=0.8, seed=3)),
    (prompts_from_chain(4, seed=9), 18, True, SamplingConfig(temperature=1.2, seed=4)),
    (prompts_from_chain(2, seed=4), 60, False, None),
    (prompts_from_chain(4, seed=5), 20, True, None),
    (prompts_from_chain(3, seed=6), 1, True, None),  # the prefill's token only
]


@pytest.mark.parametrize("kind", KINDS)
def test_one_engine_serves_a_sequence_of_requests(kind):
    """Every request decodes what it decodes in a fresh engine (greedy and sampled alike: each
    request reseeds the device generator), whatever came before it in the same slots."""
    model = trained_model(kind, 2)
    shared = DecodingEngine(model)
    for prompts, new, speculative, sampling in REQUESTS:
        kwargs = dict(speculative=speculative)
        if sampling is not None:
            kwargs["sampling"] = sampling
        got = shared.generate(prompts, new, **kwargs)
        want = DecodingEngine(model).generate(prompts, new, **kwargs)
        assert got.tokens == want.tokens, (len(prompts), new, speculative, sampling)
        assert all(len(t) == new for t in got.tokens)
        if speculative:
            assert got.stats.to_dict() == want.stats.to_dict()
        if sampling is None and speculative:  # and greedy speculative is greedy
            assert got.tokens == shared.generate(prompts, new).tokens
    # Slots (batch, cache length) shared by requests: (4, 64), (1, 16), (8, 64), (2, 96) and
    # (4, 32) (the last request), plus (4, 16) for a plain rerun of a greedy speculative one.
    assert sorted(shared._slots) == [(1, 16), (2, 96), (4, 16), (4, 32), (4, 64), (8, 64)]


def test_replayed_phases_serve_later_requests(monkeypatch):
    """The engine's graph bookkeeping, with a stand-in for graph capture that replays the
    captured closure: a phase is captured once per (slot, mode, prompt bucket) and its replays
    read nothing but the slot's buffers (a closure that kept a request's own values would decode
    later requests wrongly)."""
    captures, replays = [], []

    def fake_replayer(step, pool=None, generators=()):
        step()  # the real first run
        captures.append(step)

        def replay():
            replays.append(step)
            step()

        replay.pool = "pool"
        return replay

    monkeypatch.setattr(accelerator, "graphs_supported", lambda: True)
    monkeypatch.setattr(accelerator, "graph_replayer", fake_replayer)
    model = trained_model("deepseek", 2)
    graphed = DecodingEngine(model, compile=False)
    assert graphed.graphs
    monkeypatch.setattr(accelerator, "graphs_supported", lambda: False)
    eager = DecodingEngine(model)
    captured = []
    for prompts, new, speculative, sampling in REQUESTS + REQUESTS[:3]:
        kwargs = dict(speculative=speculative, sampling=sampling or SamplingConfig())
        before = len(captures)
        got = graphed.generate(prompts, new, **kwargs)
        assert got.tokens == eager.generate(prompts, new, **kwargs).tokens
        assert got.captured == len(captures) - before
        captured.append(got.captured)
    assert graphed.captured == len(captures) == len(graphed._phases)
    # A prefill and a step per new (slot, mode); repeated requests replay only.
    assert captured[0] == 2 and captured[-3:] == [0, 0, 0]
    assert len(replays) > 10 * len(captures) and all(step in captures for step in replays)


def test_eos_stops_each_sequence():
    model = trained_model("deepseek", 2)
    engine = DecodingEngine(model)
    prompts = prompts_from_chain(4)
    ref = engine.generate(prompts, 30)
    eos = ref.tokens[0][5]  # a token that occurs: sequences must stop right after it
    plain = engine.generate(prompts, 30, eos_id=eos)
    spec = engine.generate(prompts, 30, eos_id=eos, speculative=True)
    assert spec.tokens == plain.tokens
    assert plain.tokens[0][-1] == eos and len(plain.tokens[0]) <= 6
    for want, got in zip(ref.tokens, plain.tokens):  # cut right after the first EOS, or not at all
        assert got == (want[: want.index(eos) + 1] if eos in want else want)
    # EOS as the very first token: nothing after it.
    first = ref.tokens[1][0]
    for speculative in (False, True):
        got = engine.generate(prompts, 30, eos_id=first, speculative=speculative).tokens
        assert got[1] == [first]
    # The EOS id of one request does not stay with the engine.
    assert engine.generate(prompts, 30).tokens == ref.tokens
    # Stopped sequences stop counting: fewer rounds than without EOS.
    assert spec.stats.main_forwards < engine.generate(prompts, 30, speculative=True).stats.main_forwards


@pytest.mark.parametrize("kind, drafts", [("deepseek", None), ("parallel", None), ("deepseek", 5)])
def test_rolled_back_caches_equal_a_fresh_prefill(kind, drafts):
    """After rounds with rejections, every cache holds what a fresh prefill of the final tokens
    computes — also when the slot served a longer request before, and when the last module's
    chained drafts (`drafts` 5 > depth 3) wrote entries past the final tokens."""
    model = trained_model(kind, 3)
    slot = Slot(model, 4, 64)
    dec = SpeculativeDecoder(model, slot, draft_tokens=drafts)
    sampler = Sampler(GREEDY_MODE, slot.temperature, slot.top_p, torch.Generator())

    def run(prompts, new, rounds):
        slot.load(prompts, new, None, 0, 16, 0.0, 1.0)
        dec.prefill(16, sampler, False)
        for _ in range(rounds):
            dec.round(sampler, False)

    run(prompts_from_chain(4, seed=8), 40, 12)  # a longer request first
    prompts = prompts_from_chain(3)
    run(prompts, 30, 6)
    assert dec.stats(dec.rounds_by_accepted[:3]).accepted[2] < 3 * 6  # there were rejections
    for b in range(len(prompts)):
        m = int(slot.m[b])
        # Main model: cache positions [0, m) equal a fresh prefill of the final tokens.
        fresh = new_cache(model, 1, m)
        main_forward(model, fresh, slot.tokens[b : b + 1, :m], torch.arange(m)[None], m)
        for layer in range(len(model.blocks)):
            torch.testing.assert_close(slot.cache.kv[layer][b, :m], fresh.kv[layer][0],
                                       rtol=1e-4, atol=1e-5)
        # The drafter's caches: a fresh decoder prefilled with the final tokens (its prompt:
        # all but the newest) catches up from scratch.
        ref_slot = Slot(model, 1, 64)
        ref = SpeculativeDecoder(model, ref_slot)
        ref_slot.load([slot.tokens[b, :m].tolist()], 5, None, 0, 64, 0.0, 1.0)
        ref.prefill(64, sampler, False)
        assert int(ref_slot.m[0]) == m
        for k, (mine, theirs) in enumerate(zip(dec.drafter.caches, ref.drafter.caches), start=1):
            valid = m - k + 1 if kind == "deepseek" else m
            torch.testing.assert_close(mine.kv[0][b, :valid], theirs.kv[0][0, :valid],
                                       rtol=1e-4, atol=1e-5)


# (kind, depth, drafts a round): more than the depth (the last DeepSeek module chained, with D=1
# and D=2) and fewer (DeepSeek and parallel heads).
DRAFT_COUNTS = [("deepseek", 1, 3), ("deepseek", 2, 4), ("deepseek", 3, 2), ("parallel", 3, 2)]


@pytest.mark.parametrize("kind, depth, drafts", DRAFT_COUNTS)
def test_drafts_a_round_other_than_the_depth(kind, depth, drafts):
    """N drafts a round instead of D: greedy output stays plain greedy's, in one engine that
    serves other requests too, and every draft position is accepted at times and rejected at
    times (the chained drafts are real drafts, not padding)."""
    model = trained_model(kind, depth)
    engine = DecodingEngine(model, draft_tokens=drafts)
    assert engine.draft_tokens == drafts
    for prompts in (prompts_from_chain(5), prompts_from_chain(1, seed=3), prompts_from_chain(5)):
        plain = engine.generate(prompts, 30)
        spec = engine.generate(prompts, 30, speculative=True)
        assert spec.tokens == plain.tokens
    st = spec.stats
    assert len(st.proposed) == len(st.accepted) == drafts
    assert all(0 < a < p for a, p in zip(st.accepted, st.proposed)), st.to_dict()
    assert st.mean_tokens_per_forward() > 1 + st.accepted[0] / st.proposed[0]
    # Per sequence: the prefill's token, then rounds of 1..N+1 tokens up to (or past) 30.
    assert 5 * 29 <= st.tokens <= 5 * (29 + drafts)


def _reference_draft_states(model, tokens: torch.Tensor, drafts: list[int]) -> list:
    """The normed hidden state behind each draft of a DeepSeek tail, recomputed without a cache
    by the modules' training forward from the final tokens [1, m + 1] and the drafts: module k
    over positions < m, then the last module reapplied at positions m, m + 1, … to its own
    output at the position before and to the previous draft."""
    m, emb = tokens.shape[1] - 1, model.embedding.embed
    ahead = torch.cat([tokens, torch.tensor([drafts])], 1)  # t_0..t_m, then the drafts

    def future(k, n):  # Emb(t_{i+k}) at positions i < n
        return emb(ahead[:, k: k + n])

    layers, normed = model.tail.objective.layers, []
    h = model.tail.final_norm(model.trunk(tokens[:, :m]))  # h⁰ at positions < m [1, m, d]
    for k, module in enumerate(layers, start=1):
        h_in, h = h, module(h, future(k, m))  # hᵏ at positions < m
        normed.append(module.out_norm(h[0, -1]))
    for _ in range(len(drafts) - len(layers)):
        h = layers[-1](torch.cat([h_in, h[:, m - 1:]], 1), future(len(layers), h.shape[1] + 1))
        normed.append(layers[-1].out_norm(h[0, -1]))
    return normed


@torch.no_grad()
def test_chained_drafts_are_the_last_module_reapplied():
    """After a prefill and after rounds, each draft's normed hidden state (what `_pick` reads)
    is the cache-free recomputation's, chained drafts included (D = 2, N = 4, random model)."""
    torch.manual_seed(0)
    model = MTPLanguageModel(tiny_config("deepseek", 2, max_seq_len=96), single_process_context(),
                             seed=3)
    randomize_(model)
    model.eval()
    slot = Slot(model, 2, 64)
    dec = SpeculativeDecoder(model, slot, draft_tokens=4)
    picked = []  # the normed hidden state [B, d] behind every draft, in order
    pick = dec.drafter._pick
    dec.drafter._pick = lambda hidden: (picked.append(hidden.clone()), pick(hidden))[1]
    sampler = Sampler(GREEDY_MODE, slot.temperature, slot.top_p, torch.Generator())
    slot.load([[5, 6, 7, 8, 9], [1, 2, 3]], 30, None, 0, 8, 0.0, 1.0)
    dec.prefill(8, sampler, False)
    for rounds in range(4):
        if rounds:
            picked.clear()
            dec.round(sampler, False)
        for b in range(2):
            m, drafts = int(slot.m[b]), dec.drafts[b].tolist()
            normed = _reference_draft_states(model, slot.tokens[b, : m + 1][None], drafts)
            assert len(picked) == len(normed) == 4
            for j, (mine, ref) in enumerate(zip(picked, normed), start=1):
                torch.testing.assert_close(mine[b], ref, rtol=1e-4, atol=1e-4,
                                           msg=f"round {rounds}, row {b}, draft {j}")
            assert drafts == [int(model.embedding.logits(z).argmax()) for z in normed]


def test_draft_counts_a_tail_cannot_draft_are_refused():
    for kind, depth, drafts, match in (
            ("parallel", 2, 3, r"draft_tokens = 3 exceeds this tail's depth 2.*at most 2"),
            ("blockwise", 1, 2, r"draft_tokens = 2 exceeds this tail's depth 1"),
            ("deepseek", 1, 0, r"draft_tokens = 0 must be >= 1")):
        with pytest.raises(ValueError, match=match):
            DecodingEngine(trained_model(kind, depth), draft_tokens=drafts)
    none = MTPLanguageModel(tiny_config("none"), single_process_context())
    with pytest.raises(ValueError, match="draft_tokens = 2 needs an MTP tail"):
        DecodingEngine(none, draft_tokens=2)
    # The context must hold 2·N + 2 positions past prompt and new tokens.
    engine = DecodingEngine(trained_model("deepseek", 1), draft_tokens=4)
    with pytest.raises(ValueError, match=r"\+ 2·drafts \+ 2 \(10\) = 120 exceeds"):
        engine.generate([[1] * 80], 30, speculative=True)
    assert len(engine.generate([[1] * 80], 6, speculative=True).tokens[0]) == 6  # 80 + 6 + 10


def test_topk_relaxation_accepts_more_and_all_with_k_equal_vocab():
    model = trained_model("blockwise", 3)
    engine = DecodingEngine(model)
    prompts = prompts_from_chain(3)
    exact = engine.generate(prompts, 24, speculative=True)
    loose = engine.generate(prompts, 24, speculative=True, topk=model.config.model.vocab_size)
    assert loose.stats.mean_tokens_per_forward() == pytest.approx(4.0, abs=0.2)
    assert loose.stats.accepted == loose.stats.proposed
    assert exact.stats.mean_tokens_per_forward() < loose.stats.mean_tokens_per_forward()


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_models_too(kind):
    torch.manual_seed(0)
    model = MTPLanguageModel(tiny_config(kind, 2, max_seq_len=96), single_process_context(), seed=5)
    randomize_(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    assert generate_speculative(model, prompts, 20).tokens == generate(model, prompts, 20).tokens


def test_bad_requests_are_refused():
    model = trained_model("deepseek", 1)
    engine = DecodingEngine(model)
    with pytest.raises(ValueError, match="temperature = -1"):
        engine.generate([[1]], 5, SamplingConfig(temperature=-1))
    with pytest.raises(ValueError, match=r"\(80\) \+ max_new_tokens \(30\) \+ 2·drafts \+ 2 \(4\) "
                                         r"= 114 exceeds model.max_seq_len = 96"):
        engine.generate([[1] * 80], 30, speculative=True)
    with pytest.raises(ValueError, match=r"\+ 1 = 97 exceeds"):
        engine.generate([[1] * 80], 16)
    engine.generate([[1] * 80], 15)  # exactly the context: 80 + 15 + 1 = 96
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], 5)
    with pytest.raises(ValueError, match="max_new_tokens = 0"):
        engine.generate([[1]], 0)
    with pytest.raises(ValueError, match="greedy decoding only"):
        engine.generate([[1]], 5, SamplingConfig(temperature=1.0), speculative=True, topk=3)
    none = MTPLanguageModel(tiny_config("none"), single_process_context())
    with pytest.raises(ValueError, match="needs an MTP tail"):
        DecodingEngine(none).generate([[1]], 5, speculative=True)
    with pytest.raises(ValueError, match="device graphs need a GPU"):
        DecodingEngine(model, graphs=True)
    # A refused request leaves the engine as it was.
    assert engine.generate([[1, 2]], 5).tokens == generate(model, [[1, 2]], 5).tokens


def decode_tp2_like_tp1(rank, world):
    """World 2: the same model at TP = 2 (each rank its shards) and at TP = 1; greedy plain and
    speculative decoding through engines, plain sampling with a seed. The model is random
    (no training in the world's processes), its drafts mostly rejected: rollbacks included."""
    import torch.distributed as dist

    from model import ParallelContext
    from model.sharding import full_state_dict, load_full_state_dict

    torch.manual_seed(0)
    ref = MTPLanguageModel(tiny_config("deepseek", 2, max_seq_len=96), single_process_context(),
                           seed=5)  # TP = 1 in this process (its own group of one)
    randomize_(ref)
    ref.eval()
    group = dist.new_group([0, 1])
    tp = MTPLanguageModel(ref.config, ParallelContext(group))
    load_full_state_dict(tp, full_state_dict(ref, ref.embedding.tp_group), group)
    tp.eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    sampled = SamplingConfig(temperature=1.0, seed=2)
    out = {}
    for name, model in (("tp1", ref), ("tp2", tp)):
        engine = DecodingEngine(model)
        out[name] = (engine.generate(prompts, 20).tokens,
                     engine.generate(prompts, 20, speculative=True).tokens,
                     engine.generate(prompts, 20, speculative=True).stats.to_dict(),
                     engine.generate(prompts, 20, sampled).tokens)
        # Drafts over a third of the vocabulary: at TP 2 its head rows come from both shards.
        reduced = DecodingEngine(model, draft_vocab=torch.arange(0, ref.config.model.vocab_size, 3))
        greedy = reduced.generate(prompts, 20, speculative=True)
        out[name] += (greedy.tokens, greedy.stats.to_dict(),
                      reduced.generate(prompts, 20, sampled, speculative=True).tokens)
        # Four drafts a round from a tail of depth 2: the last module chained twice.
        chained = DecodingEngine(model, draft_tokens=4).generate(prompts, 20, speculative=True)
        out[name] += (chained.tokens, chained.stats.to_dict())
    return out


def test_tp2_decoding_equals_tp1():
    for out in run_world(decode_tp2_like_tp1, 2, timeout_s=180):
        (plain, spec, stats, sampled, reduced, reduced_stats, reduced_sampled, chained,
         chained_stats) = out["tp2"]
        assert plain == out["tp1"][0] and spec == plain
        assert stats == out["tp1"][2]
        assert sampled == out["tp1"][3]  # same generator stream on every rank and at TP = 1
        assert reduced == plain and reduced_stats == out["tp1"][5]
        assert reduced_sampled == out["tp1"][6]
        assert chained == plain and chained_stats == out["tp1"][8]
        assert chained_stats["depth"] == 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_reduced_draft_vocabulary_changes_acceptance_not_output(kind):
    """Drafts over half the vocabulary: greedy output stays plain greedy's, every draft lies
    in the K tokens, and fewer drafts are accepted than over the whole vocabulary (the chain's
    next token is outside the K about half the time)."""
    model = trained_model(kind, 2)
    ids = torch.arange(0, model.config.model.vocab_size, 2)  # the even ids
    prompts = prompts_from_chain(5)
    full = DecodingEngine(model).generate(prompts, 30, speculative=True)
    engine = DecodingEngine(model, draft_vocab=ids)
    reduced = engine.generate(prompts, 30, speculative=True)
    assert reduced.tokens == full.tokens == DecodingEngine(model).generate(prompts, 30).tokens
    drafts = next(d for d in engine._decoders.values() if isinstance(d, SpeculativeDecoder))
    assert bool((drafts.drafts % 2 == 0).all()), drafts.drafts
    assert 0 < reduced.stats.accepted[0] < full.stats.accepted[0]
    assert reduced.stats.proposed[0] > full.stats.proposed[0]  # more rounds for the same tokens


def test_draft_vocabulary_choice_and_bad_ids():
    from model.generation.draft_vocab import DraftVocabulary, most_frequent

    counts = torch.tensor([5, 9, 0, 9, 1, 7])
    assert most_frequent(counts, 3).tolist() == [1, 3, 5]  # ascending ids of the top 3
    assert most_frequent(counts, 4).tolist() == [0, 1, 3, 5]
    assert most_frequent(torch.tensor([2, 2, 2]), 2).tolist() == [0, 1]  # ties: lower ids
    with pytest.raises(ValueError, match=r"size 7 must lie in \[1, 6\]"):
        most_frequent(counts, 7)
    model = trained_model("deepseek", 1)
    v = model.config.model.vocab_size
    with pytest.raises(ValueError, match=rf"must lie in \[0, {v}\)"):
        DraftVocabulary(model, torch.tensor([0, v]))
    with pytest.raises(ValueError, match="distinct"):
        DraftVocabulary(model, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="at least one"):
        DraftVocabulary(model, torch.tensor([], dtype=torch.long))
    vocab = DraftVocabulary(model, torch.tensor([4, 1]))
    z = torch.randn(3, model.config.model.hidden_size)
    torch.testing.assert_close(vocab.logits(z), model.embedding.logits(z)[:, [4, 1]],
                               rtol=1e-6, atol=1e-6)
    probs = torch.tensor([[0.25, 0.75]])
    full = vocab.scatter(probs)
    assert full.shape == (1, v) and full[0, 4] == 0.25 and full[0, 1] == 0.75
    assert float(full.sum()) == 1.0
