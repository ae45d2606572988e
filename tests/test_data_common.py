"""Shared helpers of the data-pipeline tests: a tiny synthetic code corpus and dataset builds.

Builds are cached per test session (keyed by their settings) so the whole data suite trains a
handful of tiny tokenizers at most.
"""

from __future__ import annotations

import random
import tarfile
from pathlib import Path

import numpy as np

from data_pipeline import BuildConfig, build_dataset, load_manifest
from data_pipeline.sources import list_stdlib

WORDS = ("value", "index", "count", "name", "result", "items", "total", "data", "node", "key",
         "offset", "buffer", "parse", "update", "render", "token", "window", "shard", "batch")

TINY = {"vocab_size": 320, "seq_len": 16, "max_depth": 3, "val_fraction": 0.1,
        "shard_samples": 24, "tokenizer_sample_bytes": 200_000}

_BUILDS: dict = {}


def write_corpus(root: Path, n_files: int = 30, seed: int = 0) -> Path:
    """Deterministic Python-like files (a few hundred bytes to ~1.5 kB each) under `root`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f'"""Module {i}: {rng.choice(WORDS)} helpers."""', ""]
        for _ in range(rng.randint(2, 8)):
            a, b = rng.sample(WORDS, 2)
            lines += [f"def {a}_{b}_{rng.randint(0, 99)}({a}, {b}=None):",
                      f"    if {b} is None:",
                      f"        {b} = [{rng.randint(0, 9)}, {rng.randint(10, 99)}]",
                      f"    return {a} + len({b})  # {rng.choice(WORDS)}", ""]
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i:02d}.py").write_text("\n".join(lines))
    (root / "README.txt").write_text("not matched by **/*.py\n")
    return root


def tiny_config(source, out_dir, **overrides) -> BuildConfig:
    return BuildConfig(source=str(source), out_dir=out_dir,
                       **{**TINY, "num_workers": 2, "progress": False, **overrides})


def tiny_dataset(tmp_path_factory, **overrides) -> Path:
    """Build (once per session per settings) a tiny dataset; returns its directory."""
    key = tuple(sorted(overrides.items()))
    if key not in _BUILDS:
        base = tmp_path_factory.mktemp("tiny")
        corpus = write_corpus(base / "corpus")
        build_dataset(tiny_config(corpus, base / "data", **overrides))
        _BUILDS[key] = base / "data"
    return _BUILDS[key]


def read_all_windows(data_dir: Path, split: str) -> dict[int, np.ndarray]:
    """Every stored window of a split, read with plain tarfile (independent of the loader)."""
    m = load_manifest(data_dir)
    out = {}
    for s in m.shards(split):
        with tarfile.open(s.path) as t:
            for member in t:
                f = t.extractfile(member)
                assert f is not None
                out[int(member.name.split(".")[0])] = np.frombuffer(f.read(), dtype=m.dtype)
    return out


def test_stdlib_listing_skips_site_packages_and_test_data():
    refs = list_stdlib()
    names = [r.name for r in refs]
    assert names == sorted(names) and len(names) == len(set(names))
    assert "json/__init__.py" in names and "os.py" in names
    assert not any("site-packages" in n for n in names)
    assert not any(n.startswith(("test/tokenizedata/", "lib2to3/tests/data/", "pydoc_data/"))
                   for n in names)
    assert any(n.startswith("test/test_dataclasses/") for n in names)  # test code itself stays
    assert len(refs) > 500
