"""Streaming the wanted samples out of tar shards (webdataset's tar iterator) with checks.

Every anomaly becomes a `ShardError` that names the shard: tar errors, truncation (a sample the
manifest promises never arrives; Python's tarfile ends a stream silently at a damaged header
after the first member), unexpected members, wrong sample sizes, token ids >= vocab size.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

import numpy as np
from webdataset.filters import reraise_exception
from webdataset.tariterators import tar_file_iterator

from .manifest import ShardError, ShardInfo
from .shard_writer import KEY_DIGITS, SAMPLE_MEMBER

_READ_BUFFER = 1 << 20


def _key_of(fname: str) -> int | None:
    key, dot, ext = fname.partition(".")
    if dot and ext == SAMPLE_MEMBER and len(key) == KEY_DIGITS and key.isdigit():
        return int(key)
    return None


def stream_shard(shard: ShardInfo, wanted: set[int], dtype: np.dtype, window_len: int,
                 vocab_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (sample index, window) for each index in `wanted`, in the shard's stored order.

    Stops reading as soon as the last wanted sample is found. Raises ShardError on any anomaly.
    """
    remaining = set(wanted)
    nbytes = window_len * dtype.itemsize
    lo, hi = shard.first_index, shard.first_index + shard.num_samples

    def select(fname: str) -> bool:
        gid = _key_of(fname)
        return gid is None or gid in remaining  # unknown names are selected to be reported

    try:
        with open(shard.path, "rb", buffering=_READ_BUFFER) as f:
            for member in tar_file_iterator(f, select_files=select, handler=reraise_exception):
                fname, data = member["fname"], member["data"]
                gid = _key_of(fname)
                if gid is None or not lo <= gid < hi:
                    raise ShardError(shard.name, f"unexpected member {fname!r} (expected "
                                                 f"{lo:0{KEY_DIGITS}d}..{hi - 1:0{KEY_DIGITS}d}"
                                                 f".{SAMPLE_MEMBER}); the file is corrupt")
                if len(data) != nbytes:
                    raise ShardError(shard.name, f"member {fname!r} has {len(data)} bytes, expected "
                                                 f"{nbytes}; the file is corrupt")
                window = np.frombuffer(data, dtype=dtype)
                top = int(window.max())
                if top >= vocab_size:
                    raise ShardError(shard.name, f"member {fname!r} holds token id {top} >= vocab "
                                                 f"size {vocab_size}; the file is corrupt")
                remaining.discard(gid)
                yield gid, window
                if not remaining:
                    return
    except ShardError:
        raise
    except FileNotFoundError as exc:
        raise ShardError(shard.name, f"is missing ({shard.path})") from exc
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ShardError(shard.name, f"is corrupt or truncated ({type(exc).__name__}: "
                                     f"{str(exc).split(' @ ')[0]})") from exc
    if remaining:
        first_missing = min(remaining)
        raise ShardError(shard.name, f"is truncated or corrupt: the tar stream ended without sample "
                                     f"{first_missing:0{KEY_DIGITS}d} (and {len(remaining) - 1} more "
                                     f"wanted)")
