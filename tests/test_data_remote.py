"""Datasets read over HTTP (a real server on the loopback interface), through pipe: commands and
s3:// (through its configurable command): the same batches as the local copy, transient
failures retried where the stream broke, permanent ones named by URL, an optional cache."""

from __future__ import annotations

import itertools
import stat
from pathlib import Path

import pytest
import torch

from data_pipeline import RemoteOptions, ShardError, ShardLoader, load_manifest
from tests.http_fixtures import serve
from tests.test_data_common import tiny_dataset

FAST = RemoteOptions(retries=3, backoff_s=0.01)
BATCHES = 25  # of 3 samples: several of the 24-sample shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def server(data):
    srv = serve(data)
    yield srv
    srv.shutdown()


def batches(location, n=BATCHES, remote=FAST, **kw):
    args = {"dp_rank": 0, "dp_size": 1, "num_workers": 0, "batch_size": 3, "seed": 7,
            "depth": 2, "shuffle_buffer": 50, "mask_cross_document": True}
    args.update(kw)
    ld = ShardLoader(location, "train", remote=remote, **args)
    return list(itertools.islice(iter(ld), n)), ld


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in ("input_ids", "labels", "loss_mask"):
            assert torch.equal(g[key], w[key])


@pytest.fixture(scope="module")
def local(data):
    return batches(data)[0]


def test_http_pipe_and_s3_give_the_local_batches(data, server, local, tmp_path):
    got, ld = batches(server.url("ok"), num_workers=2)
    assert_same(got, local)
    assert ld.retries == []
    assert_same(batches(f"pipe:cat {data}/{{name}}")[0], local)
    # s3://bucket/KEY through the configured command; here `cat` stands in for the AWS CLI
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "tiny").symlink_to(data)
    s3 = RemoteOptions(retries=0, s3_command=f"cat {tmp_path}/{{bucket}}/{{key}}")
    assert_same(batches("s3://bucket/tiny", remote=s3)[0], local)


def test_a_dropped_connection_is_resumed_at_the_byte_reached(server, local):
    before = len(server.requests)
    got, ld = batches(server.url("drop"))  # no worker prefetching: exact request accounting
    assert_same(got, local)
    shards = {n for m, n, _ in server.requests[before:] if n.endswith(".tar")}
    ranges = [(n, r) for m, n, r in server.requests[before:] if r is not None]
    sizes = {s.name: s.size for s in load_manifest(server.url("ok")).shards("train")}
    # each shard: one GET that broke half-way, one Range request for exactly the rest
    assert ranges and sorted(ranges) == sorted(set(ranges))
    assert all(r == f"bytes={sizes[n] // 2}-" for n, r in ranges), ranges
    assert shards == {n for n, _ in ranges}, (ranges, server.requests[before:])
    assert len(ld.retries) == len(ranges)
    assert all("curl exit 18" in r and "retry 1/3" in r and "/drop/train-" in r
               for r in ld.retries)


def test_a_server_that_ignores_ranges_is_read_again_from_the_start(server, local):
    got, ld = batches(server.url("norange"))
    assert_same(got, local)
    assert ld.retries and all("retry 1/3" in r for r in ld.retries)


@pytest.mark.parametrize("mode,message", [
    ("corrupt", r"sha256 differs from the manifest"),
    ("gone", r"HTTP 404"),
    ("short", r"is truncated: the stream ended cleanly after \d+ of the \d+ bytes"),
])
def test_permanent_failures_name_the_url(server, mode, message):
    url = server.url(mode)
    with pytest.raises(ShardError, match=rf"^shard train-\d+\.tar: {url}train-\d+\.tar: {message}"):
        batches(url)
    # no retry for what a retry cannot fix
    tars = [r for r in server.requests if r[0] == mode and r[1].endswith(".tar")]
    assert len(tars) == 1


def flaky_command(tmp_path: Path, data: Path) -> str:
    """A pipe: command that fails half-way through the first read of every shard."""
    script = tmp_path / "flaky.sh"
    script.write_text(f"""#!/bin/sh
f="{data}/$1"; mark="{tmp_path}/seen-$1"
case "$1" in *.tar)
  if [ ! -e "$mark" ]; then touch "$mark"; head -c 1000 "$f"; echo "flaky: reset" >&2; exit 3; fi;;
esac
exec cat "$f"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"pipe:{script} {{name}}"


def test_pipe_failures_are_retried_or_named(data, local, tmp_path):
    got, ld = batches(flaky_command(tmp_path, data))
    assert_same(got, local)
    # the 1000 bytes written before the command failed are kept (the retry skips them)
    assert ld.retries and all("exited with status 3: flaky: reset; retry 1/3" in r
                              and r.endswith("at byte 1000") for r in ld.retries)
    # a command that always fails on shards: named after the retries are spent
    broken = tmp_path / "broken.sh"
    broken.write_text(f'#!/bin/sh\ncase "$1" in *.tar) echo "no such object" >&2; exit 1;; esac\n'
                      f'exec cat "{data}/$1"\n')
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(ShardError, match=r"failed 2 times, last: .* exited with status 1: no such "
                                         r"object; giving up \(data.remote.retries = 1\)"):
        batches(f"pipe:{broken} {{name}}", remote=RemoteOptions(retries=1, backoff_s=0.0))
    with pytest.raises(ValueError, match=r"no dataset manifest readable at 'pipe:cat /nonexistent"):
        batches("pipe:cat /nonexistent/{name}", remote=RemoteOptions(retries=0))


def test_cache_serves_the_second_read(server, local, tmp_path):
    cached = RemoteOptions(retries=0, cache_dir=str(tmp_path / "cache"))
    got, _ = batches(server.url("ok"), remote=cached)
    assert_same(got, local)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files and all(len(f.split("-", 1)[0]) == 64 for f in files)  # sha256-name
    before = [r for r in server.requests if r[1].endswith(".tar")]
    got, _ = batches(server.url("ok"), remote=cached)
    assert_same(got, local)
    assert [r for r in server.requests if r[1].endswith(".tar")] == before  # no shard fetched
    # a damaged cache entry is noticed (sha256) and fetched again
    victim = next((tmp_path / "cache").iterdir())
    victim.write_bytes(b"garbage")
    assert_same(batches(server.url("ok"), remote=cached)[0], local)
