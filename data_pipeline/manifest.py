"""The dataset manifest (`manifest.json`): what was built, from what, and every shard's checksum."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import SPECIAL_IDS
from .shard_writer import file_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "mtp-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard file is missing, has the wrong size/sha256, or cannot be read as a tar archive.

    `problem` says what is wrong with the shard; the fix depends on who reads it, so
    `describe(skip)` appends it with the caller's own way to skip a shard (a flag, a config key);
    str() names this package's (ShardLoader's `skip_corrupt`)."""

    def __init__(self, shard: str, problem: str):
        self.shard = shard
        self.problem = problem
        super().__init__(self.describe("pass skip_corrupt=True"))

    def describe(self, skip: str) -> str:
        return (f"shard {self.shard}: {self.problem}; rebuild the dataset with "
                f"`mtp prepare --overwrite`, or {skip} to skip the shard")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: Path
    split: str
    first_index: int
    num_samples: int
    size: int
    sha256: str


@dataclass
class Manifest:
    """A loaded, validated manifest; `data` is the raw JSON object."""

    path: Path
    data: dict
    status: str = "loaded"
    """"loaded", or from build_dataset: "built" / "up-to-date"."""

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def vocab_size(self) -> int:
        return int(self.data["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.data["seq_len"])

    @property
    def max_depth(self) -> int:
        return int(self.data["max_depth"])

    @property
    def window_len(self) -> int:
        return int(self.data["window_len"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"]).newbyteorder("<")

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.data["special_ids"])

    @property
    def eos_id(self) -> int:
        return int(self.data["special_ids"]["eos"])

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.data["tokenizer"]["path"]

    @property
    def fingerprint(self) -> str:
        return str(self.data["build_fingerprint"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise ValueError(f"split = {split!r} is invalid; use one of {SPLITS}")
        return [ShardInfo(name=s["name"], path=self.root / s["name"], split=split,
                          first_index=int(s["first_index"]), num_samples=int(s["num_samples"]),
                          size=int(s["size"]), sha256=s["sha256"])
                for s in self.data["splits"][split]["shards"]]

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def check_shard_sizes(self, split: str | None = None) -> list[ShardError]:
        """Cheap check (stat only): every shard exists with the recorded size."""
        problems = []
        for sp in (split,) if split else SPLITS:
            for s in self.shards(sp):
                try:
                    size = os.stat(s.path).st_size
                except OSError as exc:
                    problems.append(ShardError(s.name, f"cannot be read ({exc.strerror}) at {s.path}"))
                    continue
                if size != s.size:
                    problems.append(ShardError(s.name, f"has {size} bytes but the manifest records "
                                                       f"{s.size} (truncated or replaced)"))
        return problems

    def verify(self, split: str | None = None) -> list[ShardError]:
        """Full check: sizes and sha256 of every shard (reads all data)."""
        problems = self.check_shard_sizes(split)
        bad = {p.shard for p in problems}
        for sp in (split,) if split else SPLITS:
            for s in self.shards(sp):
                if s.name not in bad and file_sha256(s.path) != s.sha256:
                    problems.append(ShardError(s.name, "sha256 differs from the manifest "
                                                       "(corrupted)"))
        return problems


_REQUIRED = ("format", "format_version", "build_fingerprint", "vocab_size", "seq_len", "max_depth",
             "window_len", "stride", "dtype", "special_ids", "tokenizer", "splits")


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate a manifest (a `manifest.json` or the dataset directory holding it).

    With `check_files`, the tokenizer sha256 and every shard's existence and size are checked
    (cheap); shard sha256s are only checked by `Manifest.verify()`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"no dataset manifest at {str(path)!r}; build one with `mtp prepare`") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"manifest {str(path)!r} is unreadable or not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an {FORMAT} manifest")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"manifest {str(path)!r} lacks {missing}; rebuild with `mtp prepare --overwrite`")
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"manifest {str(path)!r} has format_version {data['format_version']}, this "
                         f"code reads {FORMAT_VERSION}; rebuild with `mtp prepare --overwrite`")
    if data["special_ids"] != SPECIAL_IDS:
        raise ValueError(f"manifest {str(path)!r} has special ids {data['special_ids']}, expected {SPECIAL_IDS}")
    if data["window_len"] != data["seq_len"] + data["max_depth"] + 1:
        raise ValueError(f"manifest {str(path)!r}: window_len != seq_len + max_depth + 1")
    m = Manifest(path=path.resolve(), data=data)
    if check_files:
        tok = m.tokenizer_path
        if not tok.is_file():
            raise ValueError(f"tokenizer {str(tok)!r} named by the manifest is missing")
        if file_sha256(tok) != data["tokenizer"]["sha256"]:
            raise ValueError(f"tokenizer {str(tok)!r} does not match the manifest's sha256 (it was "
                             f"replaced after the shards were built); rebuild with `mtp prepare --overwrite`")
        problems = m.check_shard_sizes()
        if problems:
            raise problems[0]
    return m


def write_manifest(out_dir: Path, data: dict) -> Path:
    """Write atomically: a present manifest always describes a complete dataset."""
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
