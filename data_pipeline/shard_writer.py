"""Packing a token stream into fixed windows and writing them as reproducible webdataset shards.

Windows overlap by `max_depth + 1` tokens (stride = seq_len), the MTP generalisation of
Megatron's seq_len + 1 samples: every token of the stream is an input position exactly once
(except the dropped tail), and every input position has labels for all depths up to max_depth.

Shard layout: one tar member per sample, `{index:09d}.tokens`, holding the window as raw
little-endian integers (dtype in the manifest); the index counts samples across the whole split.
Members carry fixed mtime/uid/gid/names/mode, so the same windows always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import webdataset as wds

SAMPLE_MEMBER = "tokens"  # tar member extension of the token window
KEY_DIGITS = 9


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


class WindowPacker:
    """Accumulates documents (already EOS-terminated) and emits complete windows."""

    def __init__(self, window_len: int, stride: int, dtype: np.dtype):
        assert 0 < stride <= window_len
        self.window_len = window_len
        self.stride = stride
        self.dtype = np.dtype(dtype)
        self._parts: list[np.ndarray] = []
        self._buffered = 0

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        self._parts.append(tokens)
        self._buffered += len(tokens)
        if self._buffered < self.window_len:
            return []
        buf = np.concatenate(self._parts)
        n = (len(buf) - self.window_len) // self.stride + 1
        windows = [buf[k * self.stride:k * self.stride + self.window_len] for k in range(n)]
        rest = buf[n * self.stride:]  # the overlap of the last window starts the next one
        self._parts = [rest]
        self._buffered = len(rest)
        return windows

    @property
    def leftover(self) -> int:
        """Tokens that never started a complete window (dropped at the end of a split)."""
        return self._buffered


class ShardSetWriter:
    """Writes the windows of one split into `{split}-{i:06d}.tar` shards of `shard_samples` each."""

    def __init__(self, out_dir: Path, split: str, shard_samples: int, dtype: np.dtype):
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_samples = shard_samples
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []  # manifest entries, filled as shards close
        self.num_samples = 0
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._name = name
        self._tmp = self.out_dir / f".{name}.partial"
        self._file = open(self._tmp, "wb")
        # encoder=False: we hand over bytes; fixed mtime/user/group: reproducible archives. The
        # mtime must be an int: a float makes tarfile add a PAX header to every member, which
        # doubles the header parsing cost of the reader.
        self._writer = wds.TarWriter(self._file, user="mtp", group="mtp", mode=0o444,
                                     encoder=False, mtime=0)
        self._in_shard = 0
        self._first = self.num_samples

    def write(self, window: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": sample_key(self.num_samples),
                            SAMPLE_MEMBER: window.astype(self.dtype, copy=False).tobytes()})
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard == self.shard_samples:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        self.shards.append({"name": self._name, "split": self.split, "first_index": self._first,
                            "num_samples": self._in_shard, "size": final.stat().st_size,
                            "sha256": file_sha256(final)})
        self._writer = None
        self._file = None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._close_shard()
        return self.shards


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
