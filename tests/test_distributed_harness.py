import time

import pytest

from tests import dist_harness_cases as cases
from tests.distributed import DistributedTestError, run_world

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_run_across_the_world(world):
    assert run_world(cases.all_reduce_rank, world) == [float(sum(range(world)))] * world


def test_a_failing_rank_reports_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_world(cases.fail_on_rank_one, 2, timeout_s=60)
    assert "rank 1 of 2 failed" in str(err.value)
    assert "boom from rank one" in str(err.value)
    assert time.monotonic() - t0 < 45


def test_a_hanging_rank_times_out():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="timed out"):
        run_world(cases.hang_forever, 2, timeout_s=8)
    assert time.monotonic() - t0 < 25


def test_a_world_whose_port_was_taken_starts_again_on_another(monkeypatch):
    """free_port() only finds a port that was free: another process may listen on it before
    rank 0 does (two test sessions on one machine did). Such a world starts again."""
    import socket

    import pretrain.launch

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = iter([busy.getsockname()[1]])
    real = pretrain.launch.free_port
    picked = []

    def taken_first():
        picked.append(next(ports, None) or real())
        return picked[-1]

    monkeypatch.setattr(pretrain.launch, "free_port", taken_first)
    try:
        assert run_world(cases.all_reduce_rank, 2, timeout_s=60) == [1.0, 1.0]
    finally:
        busy.close()
    assert len(picked) == 2 and picked[0] != picked[1]
