"""Deterministic interleaving of several sources by weight, at sample granularity.

The mixed stream is a merge by "virtual time": sample j of source s (its j-th sample, counting
across its own epochs) is due at t(s, j) = (2j + 1) / (2 W_s), W_s the source's integer weight;
the mixed stream is every source's samples sorted by (t, s). This is stride scheduling with
half-step offsets. Properties:

* Closed form both ways: the mixed position of (s, j) is j plus, for every other source, the
  number of its samples due earlier (ties to the lower source index), an integer formula
  (`positions`); the inverse (`locate`) needs no replay from the start. A resume at mixed
  position p therefore needs p alone, and every DataLoader worker computes its share of the
  stream independently.
* Exact integers: weights are reduced to coprime integers (`integer_weights`), so the order is
  the same on every machine (no float comparisons).
* Bounded deviation: over any prefix of n samples, source s (weight share w_s = W_s / sum W, k
  sources) has c_s(n) samples with  -(3 + k·w_s)/2 <= c_s(n) - w_s·n <= (1 + 3k·w_s)/2
  (each source is within 1/2 of t·W_s at virtual time t, plus one tie; the sum over sources
  fixes t). With a single source the stream is the source's own stream.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import gcd

import numpy as np

# Weights are made integers exactly when their common denominator allows it, else quantised to
# this resolution. With positions below 2**40 (a trillion samples), (2j + 1)·W stays below 2**63.
WEIGHT_RESOLUTION = 1 << 20


def integer_weights(weights: list[float]) -> list[int]:
    """Positive weights -> coprime integers of the same ratios (quantised to 2**-20 when the
    exact ratios would need larger integers, e.g. 1/3 : 1/7 stays exact, 0.1234567 is rounded)."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"mixture weights {weights} must be positive numbers")
    fracs = [Fraction(str(w)) for w in weights]
    denom = 1
    for f in fracs:
        denom = denom * f.denominator // gcd(denom, f.denominator)
    ints = [int(f * denom) for f in fracs]
    if max(ints) > WEIGHT_RESOLUTION:
        total = sum(fracs)
        ints = [max(1, round(f / total * WEIGHT_RESOLUTION)) for f in fracs]
    g = 0
    for i in ints:
        g = gcd(g, i)
    return [i // g for i in ints]


class SampleMix:
    """The merge of `len(weights)` infinite sample streams (see the module docstring)."""

    def __init__(self, weights: list[float]):
        self.weights = integer_weights(list(weights))
        self.k = len(self.weights)
        self._w = np.asarray(self.weights, dtype=np.int64)
        self._total = int(self._w.sum())
        # Candidates searched around the expected count: more than the deviation bound.
        self._reach = 2 * self.k + 4

    @property
    def shares(self) -> list[float]:
        return [w / self._total for w in self.weights]

    def positions(self, source: int, j: np.ndarray) -> np.ndarray:
        """Mixed-stream position of sample j (array, >= 0) of `source`."""
        j = np.asarray(j, dtype=np.int64)
        if self.k == 1:
            return j.copy()
        ws = self.weights[source]
        x_num = 2 * j + 1  # t = x_num / (2 ws)
        pos = j.copy()
        for other, wo in enumerate(self.weights):
            if other == source:
                continue
            # Samples m of `other` due before (or tied, for lower indices): (2m + 1) ws <
            # (or <=) x_num · wo; the count of odd numbers q = 2m + 1 <= M is (M + 1) // 2.
            x = x_num * wo
            limit = x // ws if other < source else (x - 1) // ws
            pos += (limit + 1) // 2
        return pos

    def counts_at(self, p: int) -> list[int]:
        """Samples of each source among mixed positions [0, p)."""
        if self.k == 1:
            return [int(p)]
        out = []
        for s in range(self.k):
            lo = max(0, int(self._w[s]) * p // self._total - self._reach)
            cand = np.arange(lo, lo + 2 * self._reach + 2, dtype=np.int64)
            before = self.positions(s, cand) < p
            assert not before[-1] and (lo == 0 or self.positions(s, np.array([lo - 1]))[0] < p), \
                "mixture deviation bound violated"
            out.append(lo + int(before.sum()))
        return out

    def locate(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [b-a], sample index within the source [b-a]) of mixed positions [a, b)."""
        n = b - a
        if self.k == 1:
            return np.zeros(n, dtype=np.int64), np.arange(a, b, dtype=np.int64)
        src = np.empty(n, dtype=np.int64)
        idx = np.empty(n, dtype=np.int64)
        filled = 0
        for s, lo in enumerate(self.counts_at(a)):
            hi = int(self._w[s]) * b // self._total + self._reach + 1
            j = np.arange(lo, max(lo, hi), dtype=np.int64)
            p = self.positions(s, j)
            keep = p < b
            assert keep.size == 0 or not keep[-1], "mixture deviation bound violated"
            src[p[keep] - a] = s
            idx[p[keep] - a] = j[keep]
            filled += int(keep.sum())
        assert filled == n, "mixture positions do not tile the range"
        return src, idx


@dataclass(frozen=True)
class DataSource:
    """One corpus of a training mixture: a dataset built by `mtp prepare` (a directory, its
    manifest, or a URL / pipe: location of either) and its sampling weight."""

    path: str
    weight: float = 1.0
    name: str = ""
    """Names the source in metrics and messages; default: the dataset directory's name."""

    @property
    def label(self) -> str:
        return self.name or default_source_name(self.path)


def default_source_name(path: str | os.PathLike) -> str:
    text = str(path)
    if text.startswith("pipe:"):
        return "pipe"
    parts = [p for p in text.replace("\\", "/").split("/") if p and p not in (".", "..")]
    if parts and parts[-1].endswith(".json"):
        parts = parts[:-1]
    return parts[-1] if parts else "data"


def as_sources(data: str | os.PathLike | Sequence[DataSource]) -> list[DataSource]:
    """A dataset path (one source of weight 1) or a list of sources; names checked unique."""
    if isinstance(data, (str, os.PathLike)):
        return [DataSource(str(data))]
    sources = list(data)
    if not sources:
        raise ValueError("no data sources given; give a dataset path or at least one source")
    labels = [s.label for s in sources]
    dupes = sorted({n for n in labels if labels.count(n) > 1})
    if dupes:
        raise ValueError(f"data sources share the name(s) {dupes}; give each source its own "
                         "`name`")
    bad = [s.label for s in sources if not (isinstance(s.weight, (int, float)) and s.weight > 0)]
    if bad:
        raise ValueError(f"data source weight must be a positive number (sources {bad})")
    return sources


def check_same_tokenizer(manifests: list[tuple[str, object]]) -> None:
    """ValueError naming the first source whose tokenizer, special ids or window shape differ
    from the first source's: a mixture trains one model on one token space."""
    (ref_name, ref), *rest = manifests
    for name, m in rest:
        for what, get in (("tokenizer (sha256)", lambda x: x.tokenizer_sha256),
                          ("vocab size", lambda x: x.vocab_size),
                          ("special ids", lambda x: x.special_ids),
                          ("seq_len", lambda x: x.seq_len)):
            if get(m) != get(ref):
                raise ValueError(
                    f"data source {name!r} ({m.path}) has {what} {get(m)!r} but source "
                    f"{ref_name!r} has {get(ref)!r}; the sources of a mixture must be built "
                    f"with the same tokenizer and seq_len (`mtp prepare --tokenizer "
                    f"{ref_name}/{ref.tokenizer_name} --seq-len {ref.seq_len}`)")
