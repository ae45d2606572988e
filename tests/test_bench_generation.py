"""bench_generation's split of request time into per-request and steady-state costs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_generation import split_request_time  # noqa: E402


def test_split_recovers_the_two_costs():
    # 4 requests costing 30 ms each (prefill, first round, capture) plus 2 ms per token.
    def run(tokens):
        return 4 * 0.030 + tokens * 0.002, tokens

    per_request_ms, steady = split_request_time(*run(512), *run(128), requests=4)
    assert per_request_ms == pytest.approx(30.0)
    assert steady == pytest.approx(500.0)
    # The whole-request rate understates the steady one, more so for short requests.
    assert 512 / run(512)[0] < steady


def test_split_gives_up_when_the_runs_cannot_be_told_apart():
    assert split_request_time(1.0, 100, 1.0, 100, requests=2) == (None, None)  # EOS: same length
    assert split_request_time(0.9, 100, 1.0, 50, requests=2) == (None, None)  # noise: shorter time
