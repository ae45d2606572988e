"""Streaming the wanted samples out of tar shards with checks.

The shards are the ones `shard_writer` writes with webdataset's TarWriter: plain ustar, one
regular-file member per sample, no extended headers. They are read by a minimal ustar walk
(`_ustar_members`): header checksum and magic checked, the data of unwanted members skipped by
seeking. Python's tarfile (what webdataset's tar iterator uses) parses each header field by field
and cost 40 µs per member against 7 µs for the walk (*measured*, a 4096-member shard, busy
2-core machine): at 1024 tokens per member that is the difference between ~25 M and ~150 M
tokens/s of header parsing.

Every anomaly becomes a `ShardError` that names the shard: a bad header (checksum, magic, a
member that is not a regular file), truncation (a sample the manifest promises never arrives),
unexpected members, wrong sample sizes, token ids >= vocab size, and for remote shards the
transport's errors (data_pipeline/remote.py), with the URL.

Local shards are streamed from the file and reading stops after the last wanted sample; remote
shards are fetched whole (retried, size and sha256 checked) before any sample is handed out.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np

from .manifest import ShardError, ShardInfo
from .remote import RemoteError, RemoteOptions, RetryHook, fetch
from .shard_writer import KEY_DIGITS, SAMPLE_MEMBER

_READ_BUFFER = 1 << 20
_BLOCK = 512


class _TarFormatError(ValueError):
    pass


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise _TarFormatError(f"header field {field!r} is not an octal number") from None


def _ustar_members(f, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each member of a ustar stream whose name `select` accepts; the data of
    the others is skipped. Raises _TarFormatError on anything but plain regular files."""
    offset = 0
    while True:
        header = f.read(_BLOCK)
        if not header:
            return  # ended without the end-of-archive blocks: the sample count check decides
        if len(header) < _BLOCK:
            raise _TarFormatError(f"header at byte {offset} cut short")
        if header.count(0) == _BLOCK:
            return  # end-of-archive marker
        stored = _octal(header[148:156])
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != unsigned and stored != unsigned - 2 * sum(b for b in header if b > 127):
            raise _TarFormatError(f"bad header checksum at byte {offset}")
        if header[257:262] != b"ustar":
            raise _TarFormatError(f"no ustar header at byte {offset}")
        if header[156:157] not in (b"0", b"\0"):
            raise _TarFormatError(f"member of type {header[156:157]!r} at byte {offset} (only "
                                  "regular files are written)")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
        size = _octal(header[124:136])
        padded = -(-size // _BLOCK) * _BLOCK
        if select(name):
            data = f.read(padded)[:size]
            if len(data) < size:
                raise _TarFormatError(f"member {name!r} cut short")
            yield name, data
        else:
            f.seek(padded, 1)
        offset += _BLOCK + padded


def _key_of(fname: str) -> int | None:
    key, dot, ext = fname.partition(".")
    if dot and ext == SAMPLE_MEMBER and len(key) == KEY_DIGITS and key.isdigit():
        return int(key)
    return None


def stream_shard(shard: ShardInfo, wanted: set[int], dtype: np.dtype, window_len: int,
                 vocab_size: int, remote: RemoteOptions | None = None,
                 on_retry: RetryHook | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (sample index, window) for each index in `wanted`, in the shard's stored order.

    Stops reading as soon as the last wanted sample is found. Raises ShardError on any anomaly.
    """
    if shard.location.is_local:
        yield from _members(shard, lambda: open(shard.path, "rb", buffering=_READ_BUFFER), wanted,
                            dtype, window_len, vocab_size)
        return
    try:
        data = fetch(shard.location, shard.name, remote or RemoteOptions(), size=shard.size,
                     sha256=shard.sha256, on_retry=on_retry)
    except RemoteError as err:
        raise ShardError(shard.label, f"{err.url}: {err.problem}") from None
    yield from _members(shard, lambda: io.BytesIO(data), wanted, dtype, window_len, vocab_size)


def _members(shard: ShardInfo, opener, wanted: set[int], dtype: np.dtype, window_len: int,
             vocab_size: int) -> Iterator[tuple[int, np.ndarray]]:
    remaining = set(wanted)
    nbytes = window_len * dtype.itemsize
    lo, hi = shard.first_index, shard.first_index + shard.num_samples

    def select(fname: str) -> bool:
        gid = _key_of(fname)
        return gid is None or gid in remaining  # unknown names are selected to be reported

    try:
        with opener() as f:
            for fname, data in _ustar_members(f, select):
                gid = _key_of(fname)
                if gid is None or not lo <= gid < hi:
                    raise ShardError(shard.label, f"unexpected member {fname!r} (expected "
                                                 f"{lo:0{KEY_DIGITS}d}..{hi - 1:0{KEY_DIGITS}d}"
                                                 f".{SAMPLE_MEMBER}); the file is corrupt")
                if len(data) != nbytes:
                    raise ShardError(shard.label, f"member {fname!r} has {len(data)} bytes, expected "
                                                 f"{nbytes}; the file is corrupt")
                window = np.frombuffer(data, dtype=dtype)
                top = int(window.max())
                if top >= vocab_size:
                    raise ShardError(shard.label, f"member {fname!r} holds token id {top} >= vocab "
                                                 f"size {vocab_size}; the file is corrupt")
                remaining.discard(gid)
                yield gid, window
                if not remaining:
                    return
    except ShardError:
        raise
    except FileNotFoundError as exc:
        raise ShardError(shard.label, f"is missing ({shard.path})") from exc
    except _TarFormatError as exc:
        raise ShardError(shard.label, f"is truncated or corrupt ({exc})") from exc
    except (OSError, EOFError, ValueError) as exc:
        raise ShardError(shard.label, f"is corrupt or truncated ({type(exc).__name__}: "
                                     f"{str(exc).split(' @ ')[0]})") from exc
    if remaining:
        first_missing = min(remaining)
        raise ShardError(shard.label, f"is truncated or corrupt: the tar stream ended without sample "
                                     f"{first_missing:0{KEY_DIGITS}d} (and {len(remaining) - 1} more "
                                     f"wanted)")
