"""The dataset manifest (`manifest.json`): what was built, from what, and every shard's checksum."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .remote import MANIFEST_NAME, Location, RemoteError, RemoteOptions, fetch, parse_location
from .shard_writer import file_sha256

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
    location: Location
    split: str
    first_index: int
    num_samples: int
    size: int
    sha256: str
    label: str = ""
    """How messages name the shard: its file name, or `source/name` in a mixture."""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def path(self) -> Path:
        """The local file (local datasets only)."""
        return self.location.local_path(self.name)

    @property
    def url(self) -> str:
        return self.location.describe(self.name)


@dataclass
class Manifest:
    """A loaded, validated manifest; `data` is the raw JSON object."""

    path: Path | str
    """The manifest file (local), or its URL."""
    data: dict
    status: str = "loaded"
    """"loaded", or from build_dataset: "built" / "up-to-date"."""
    location: Location | None = None
    remote: RemoteOptions = RemoteOptions()

    def __post_init__(self) -> None:
        if self.location is None:
            self.location = Location("local", str(Path(self.path).parent))

    @property
    def is_local(self) -> bool:
        return self.location.is_local

    @property
    def root(self) -> Path:
        return Path(self.location.base)

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
    def special_ids(self) -> dict[str, int | None]:
        """pad/bos/eos/unk ids of the dataset's tokenizer (None: it has no such token)."""
        return dict(self.data["special_ids"])

    @property
    def tokenizer_kind(self) -> str:
        return str(self.data["tokenizer"].get("kind", "sentencepiece"))

    @property
    def eos_id(self) -> int:
        return int(self.data["special_ids"]["eos"])

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file of a local dataset (see `read_tokenizer` for any dataset)."""
        return self.location.local_path(self.data["tokenizer"]["path"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.data["tokenizer"]["path"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.data["tokenizer"]["sha256"])

    def read_tokenizer(self) -> bytes:
        """The tokenizer file's bytes (fetched for a remote dataset), checked by sha256."""
        tok = self.tokenizer_name
        if self.is_local:
            path = self.tokenizer_path
            if not path.is_file():
                raise ValueError(f"tokenizer {str(path)!r} named by the manifest is missing")
            data = path.read_bytes()
        else:
            try:
                data = fetch(self.location, tok, self.remote, sha256=self.tokenizer_sha256)
            except RemoteError as err:
                raise ValueError(f"tokenizer of the dataset at {self.path}: {err}") from None
        if hashlib.sha256(data).hexdigest() != self.tokenizer_sha256:
            raise ValueError(f"tokenizer {self.location.describe(tok)!r} does not match the "
                             "manifest's sha256 (it was replaced after the shards were built); "
                             "rebuild with `mtp prepare --overwrite`")
        return data

    @property
    def fingerprint(self) -> str:
        return str(self.data["build_fingerprint"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise ValueError(f"split = {split!r} is invalid; use one of {SPLITS}")
        return [ShardInfo(name=s["name"], location=self.location, split=split,
                          first_index=int(s["first_index"]), num_samples=int(s["num_samples"]),
                          size=int(s["size"]), sha256=s["sha256"])
                for s in self.data["splits"][split]["shards"]]

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def check_shard_sizes(self, split: str | None = None) -> list[ShardError]:
        """Cheap check (stat only): every shard exists with the recorded size. Remote shards
        are checked as they stream (size and sha256), so nothing is checked here for them."""
        problems = []
        if not self.is_local:
            return problems
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
        """Full check: sizes and sha256 of every shard (reads all data; local datasets only:
        remote shards are verified as they stream)."""
        problems = self.check_shard_sizes(split)
        if not self.is_local:
            return problems
        bad = {p.shard for p in problems}
        for sp in (split,) if split else SPLITS:
            for s in self.shards(sp):
                if s.name not in bad and file_sha256(s.path) != s.sha256:
                    problems.append(ShardError(s.name, "sha256 differs from the manifest "
                                                       "(corrupted)"))
        return problems


_REQUIRED = ("format", "format_version", "build_fingerprint", "vocab_size", "seq_len", "max_depth",
             "window_len", "stride", "dtype", "special_ids", "tokenizer", "splits")


def load_manifest(path: str | os.PathLike, check_files: bool = True,
                  remote: RemoteOptions | None = None) -> Manifest:
    """Read and validate a manifest: a `manifest.json`, the dataset directory holding it, or the
    same at an http(s)://, s3:// or pipe: location (data_pipeline/remote.py).

    With `check_files`, the tokenizer sha256 and (local datasets) every shard's existence and
    size are checked (cheap); shard sha256s are only checked by `Manifest.verify()`, or as
    remote shards stream.
    """
    remote = remote or RemoteOptions()
    location, name = parse_location(path)
    where = location.describe(name)
    if location.is_local:
        try:
            text = location.local_path(name).read_text()
        except FileNotFoundError as exc:
            raise ValueError(f"no dataset manifest at {where!r}; build one with `mtp prepare`") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"manifest {where!r} is unreadable: {exc}") from exc
    else:
        try:
            text = fetch(location, name, remote).decode()
        except RemoteError as exc:
            raise ValueError(f"no dataset manifest readable at {where!r} ({exc.problem})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {where!r} is not text: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {where!r} is unreadable or not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where!r} is not an {FORMAT} manifest")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"manifest {where!r} lacks {missing}; rebuild with `mtp prepare --overwrite`")
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"manifest {where!r} has format_version {data['format_version']}, this "
                         f"code reads {FORMAT_VERSION}; rebuild with `mtp prepare --overwrite`")
    ids = data["special_ids"]
    eos = ids.get("eos") if isinstance(ids, dict) else None
    if not isinstance(eos, int) or not 0 <= eos < data["vocab_size"] or any(
            v is not None and not isinstance(v, int) for v in ids.values()):
        raise ValueError(f"manifest {where!r} has special ids {ids}: an integer eos id below the "
                         "vocab size is needed (it separates documents); rebuild with "
                         "`mtp prepare --overwrite`")
    if data["window_len"] != data["seq_len"] + data["max_depth"] + 1:
        raise ValueError(f"manifest {where!r}: window_len != seq_len + max_depth + 1")
    m = Manifest(path=location.local_path(name) if location.is_local else where, data=data,
                 location=location, remote=remote)
    if check_files:
        m.read_tokenizer()
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
