"""Weighted mixtures: the interleaving's bound, per-source epochs, exact and layout-free resume,
and a source with another tokenizer refused by name."""

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from data_pipeline import DataSource, SampleMix, ShardLoader, build_dataset, load_manifest
from data_pipeline.mixture import integer_weights
from tests.test_data_common import read_all_windows, tiny_config, tiny_dataset, write_corpus
from tests.test_data_loader import DEPTH, rows, run_steps, take

WEIGHT_SETS = ([1], [1, 1], [0.5, 0.3, 0.2], [5, 1], [1, 2, 3, 4, 5], [0.7, 0.2, 0.1],
               [1 / 3, 1 / 3, 1 / 3], [0.013, 0.987])


def merged_reference(weights: list[int], n: int) -> list[tuple[int, int]]:
    """The definition, by brute force: every source's samples sorted by ((2j+1)/(2 W_s), s)."""
    total = sum(weights)
    items = [(Fraction(2 * j + 1, 2 * w), s, j) for s, w in enumerate(weights)
             for j in range(n * w // total + 3)]
    return [(s, j) for _, s, j in sorted(items)[:n]]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=str)
def test_interleaving_follows_the_weights_within_the_bound(weights):
    mix = SampleMix(weights)
    k, shares = mix.k, mix.shares
    n = 3000
    src, idx = mix.locate(0, n)
    assert list(zip(src.tolist(), idx.tolist())) == merged_reference(mix.weights, n)
    # Over every prefix: -(3 + k w)/2 <= c_s(n) - w n <= (1 + 3 k w)/2 (mixture.py).
    prefix = np.arange(1, n + 1)
    for s in range(k):
        dev = np.cumsum(src == s) - shares[s] * prefix
        assert dev.min() >= -(3 + k * shares[s]) / 2 and dev.max() <= (1 + 3 * k * shares[s]) / 2
        assert np.abs(dev).max() < 1.0  # what the test weights actually reach
        # the closed form inverts locate, and counts_at agrees at any position
        assert (mix.positions(s, idx[src == s]) == np.flatnonzero(src == s)).all()
    for a in (0, 1, 17, 999, 2500):
        assert mix.counts_at(a) == [int((src[:a] == s).sum()) for s in range(k)]
        sub_src, sub_idx = mix.locate(a, a + 333)
        assert (sub_src == src[a:a + 333]).all() and (sub_idx == idx[a:a + 333]).all()
    # Far into the stream: still consistent without any replay from the start.
    far = 10**12
    counts = mix.counts_at(far)
    assert sum(counts) == far
    assert all(abs(c - far * w) < 2 for c, w in zip(counts, shares))


def test_weights_become_exact_integer_ratios():
    assert integer_weights([0.5, 0.3, 0.2]) == [5, 3, 2]
    assert integer_weights([2, 2, 4]) == [1, 1, 2]
    assert integer_weights([1 / 3, 1 / 3, 1 / 3]) == [1, 1, 1]
    with pytest.raises(ValueError, match="must be positive"):
        integer_weights([1, 0])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """a: the tiny dataset; b: another corpus tokenized with a's tokenizer; c: its own tokenizer."""
    a = tiny_dataset(tmp_path_factory)
    base = tmp_path_factory.mktemp("mix")
    corpus = write_corpus(base / "corpus", n_files=8, seed=1)
    build_dataset(tiny_config(corpus, base / "b", tokenizer_path=a / "tokenizer.model",
                              shard_samples=10))
    build_dataset(tiny_config(corpus, base / "c"))
    return {"a": a, "b": base / "b", "c": base / "c"}


def mixture(sources, split="train", weights=(3, 1), **kw):
    args = {"dp_rank": 0, "dp_size": 1, "num_workers": 0, "batch_size": 4, "seed": 7,
            "depth": DEPTH, "shuffle_buffer": 50}
    args.update(kw)
    srcs = [DataSource(str(sources[n]), w, n) for n, w in zip("ab", weights)]
    return ShardLoader(srcs, split, **args)


def windows_of(path) -> Counter:
    m = load_manifest(path)
    return Counter(tuple(w[: m.seq_len + DEPTH + 1].tolist())
                   for w in read_all_windows(path, "train").values())


def test_each_sample_comes_from_its_scheduled_source_and_small_sources_restart(sources):
    a_all, b_all = windows_of(sources["a"]), windows_of(sources["b"])
    ld = mixture(sources, num_workers=2)
    n_b = sum(b_all.values())
    steps = n_b + 20  # batches of 4: b (weight 1/4) gets n_b + 20 samples, a stays in epoch 0
    got = rows(take(ld, steps))
    src, idx = SampleMix([3, 1]).locate(0, len(got))
    for row, s in zip(got, src):
        assert row in (a_all if s == 0 else b_all)
    from_b = [row for row, s in zip(got, src) if s == 1]
    assert Counter(from_b[:n_b]) == b_all  # epoch 0 of b: each of its samples once
    epoch1 = from_b[n_b:]
    assert epoch1 and Counter(epoch1) <= b_all and epoch1 != from_b[:len(epoch1)]
    state = ld.state_dict()
    per = state["consumed_per_source"]
    assert per["a"]["samples"] + per["b"]["samples"] == state["samples_consumed"] == len(got)
    assert per["b"]["samples"] == len(from_b) and per["b"]["epoch"] == 1 and per["a"]["epoch"] == 0
    assert per["b"]["tokens"] == len(from_b) * load_manifest(sources["b"]).seq_len
    assert ld.epochs == {"a": 0, "b": 1}


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 1), (1, 4), (2, 4)])
def test_mixture_resumes_exactly_at_any_step_and_layout(sources, dp_before, dp_after):
    def run(dp, steps, state=None):
        return run_steps(lambda **kw: mixture(sources, **kw), dp, 8, steps, state=state)

    reference, end = run(1, 20)
    for k in (1, 7):  # resume points in different phases of the interleaving
        first, state = run(dp_before, k)
        resumed, end2 = run(dp_after, 20 - k, state=state)
        assert first + resumed == reference
        assert end2["consumed_per_source"] == end["consumed_per_source"]


def test_mixture_state_refuses_other_weights_or_sources(sources):
    ld = mixture(sources)
    take(ld, 3)
    with pytest.raises(ValueError, match="loader state has weights=\\[3, 1\\] but this loader "
                                         "has weights=\\[1, 1\\]"):
        mixture(sources, weights=(1, 1)).load_state_dict(ld.state_dict())
    single = ShardLoader(sources["a"], "train", dp_rank=0, dp_size=1, num_workers=0,
                         batch_size=4, seed=7, depth=DEPTH, shuffle_buffer=50)
    with pytest.raises(ValueError, match="loader state has source_fingerprints="):
        single.load_state_dict(ld.state_dict())


def test_source_with_another_tokenizer_is_refused_by_name(sources):
    srcs = [DataSource(str(sources["a"]), 1, "code"), DataSource(str(sources["c"]), 1, "other")]
    with pytest.raises(ValueError, match=r"data source 'other' \(.*\) has tokenizer \(sha256\) "
                                         r"'[0-9a-f]+' but source 'code' has"):
        ShardLoader(srcs, "train", dp_rank=0, dp_size=1, num_workers=0, batch_size=2, seed=0,
                    depth=1)
    with pytest.raises(ValueError, match="share the name"):
        ShardLoader([DataSource(str(sources["a"])), DataSource(str(sources["a"]))], "train",
                    dp_rank=0, dp_size=1, num_workers=0, batch_size=2, seed=0, depth=1)
