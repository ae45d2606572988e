"""Where a dataset's files live, and reading them with retries and checksums while they stream.

A dataset location is a local directory, an `http(s)://` base URL, an `s3://` prefix, or a
`pipe:COMMAND` whose `{name}` is replaced by a file name (`pipe:cat /srv/data/{name}`,
`pipe:ssh host cat /data/{name}`). Every file is addressed relative to it: `manifest.json`, the
tokenizer, the shards. Remote bytes come through webdataset's gopen machinery (its `Pipe`, a
subprocess stream that reports the command's exit status): `http(s)` through curl, `s3://`
through a configurable command (default the AWS CLI), `pipe:` as given.

Reading a remote file (`fetch`) streams it once, hashing the bytes as they pass:
* a transient failure (connection dropped or refused, timeout, HTTP 408/429/5xx, a command that
  exits non-zero) is retried with exponential backoff, at most `retries` times per file, and the
  retry resumes at the byte reached (curl `--continue-at`; a `pipe:` or `s3://` command cannot
  seek, so it is restarted and the bytes already held are skipped). Each retry is reported
  through `on_retry` (the loader counts them and the trainer logs them);
* a permanent failure (HTTP 4xx such as 404, a checksum or size mismatch, a stream that ends
  cleanly before the size the manifest records, i.e. a truncated file) raises `RemoteError`
  naming the URL at once.
webdataset's own `gopen("http://…")` runs curl with fixed arguments: its `--retry` restarts a
transfer from byte 0 and cannot resume one that broke mid-stream (curl exits 18 there), and its
exit status does not tell a 404 from a 503. Hence the curl command line here.

A shard is held in memory once read (one per DataLoader worker) and checked against the
manifest's size and sha256 before any of its samples is used: a corrupted byte never reaches
training. With a cache directory, verified files are kept there under their sha256 and read
locally the next time (re-verified as they are read).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20
# curl exit codes that no retry can fix: unsupported protocol, malformed URL, TLS/certificate
# failures. Everything else (connect/recv failures, timeouts, partial transfers) is retried.
_CURL_PERMANENT = {1, 3, 35, 51, 58, 59, 60, 77, 80, 83, 90, 91}
_CURL_HTTP_ERROR = 22
_CURL_NO_RANGES = 33
_HTTP_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


class RemoteError(OSError):
    """A file of a remote dataset cannot be read (permanently, or after every retry)."""

    def __init__(self, url: str, problem: str):
        self.url, self.problem = url, problem
        super().__init__(f"{url}: {problem}")


class _Transient(Exception):
    pass


class _NoRanges(Exception):
    """The HTTP server ignores Range requests: restart from byte 0 and skip what is held."""


@dataclass(frozen=True)
class RemoteOptions:
    retries: int = 5
    """Retries per file after a transient failure (each resumes at the byte reached)."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each further one (capped at 30 s)."""
    stall_timeout_s: int = 60
    """An HTTP transfer slower than 1 byte/s for this long counts as failed (and is retried)."""
    cache_dir: str | None = None
    """Keep verified remote files here (by sha256) and read them from here the next time."""
    s3_command: str = "aws s3 cp {url} -"
    """Command that writes an s3:// object to stdout; {url}, {bucket} and {key} are filled in."""


@dataclass(frozen=True)
class Location:
    """A dataset's directory: `kind` is local, http, s3 or pipe."""

    kind: str
    base: str
    """Local directory, base URL (ending in '/'), or the pipe command template."""

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def describe(self, name: str) -> str:
        """The path or URL of `name`, for messages."""
        if self.kind == "local":
            return str(Path(self.base) / name)
        if self.kind == "pipe":
            return "pipe:" + self.base.replace("{name}", name)
        return self.base + name

    def local_path(self, name: str) -> Path:
        assert self.is_local, self
        return Path(self.base) / name

    def command(self, name: str, offset: int, options: RemoteOptions) -> tuple[list[str] | str, bool]:
        """(argv or shell command, can resume at `offset`) that writes file `name` to stdout."""
        if self.kind == "http":
            argv = ["curl", "--fail", "--silent", "--show-error", "--location",
                    "--connect-timeout", "30", "--speed-limit", "1",
                    "--speed-time", str(options.stall_timeout_s)]
            if offset:
                argv += ["--continue-at", str(offset)]
            return argv + ["--", self.base + name], True
        if self.kind == "s3":
            url = self.base + name
            bucket, _, key = url[len("s3://"):].partition("/")
            return options.s3_command.format(url=shlex.quote(url), bucket=shlex.quote(bucket),
                                             key=shlex.quote(key)), False
        assert self.kind == "pipe", self
        return self.base.replace("{name}", shlex.quote(name)), False


MANIFEST_NAME = "manifest.json"


def parse_location(spec: str | os.PathLike) -> tuple[Location, str]:
    """(location, manifest file name) of a dataset given as a directory, a manifest file, a URL
    of either, or a `pipe:` command template."""
    text = str(spec)
    if text.startswith("pipe:"):
        if "{name}" not in text:
            raise ValueError(f"data location {text!r} has no {{name}} placeholder; write the "
                             "command that prints one file, e.g. 'pipe:cat /srv/data/{name}'")
        return Location("pipe", text[len("pipe:"):]), MANIFEST_NAME
    for prefix, kind in (("http://", "http"), ("https://", "http"), ("s3://", "s3")):
        if text.startswith(prefix):
            if text.endswith(".json"):
                base, _, name = text.rpartition("/")
                return Location(kind, base + "/"), name
            return Location(kind, text.rstrip("/") + "/"), MANIFEST_NAME
    if "://" in text:
        raise ValueError(f"data location {text!r} has an unsupported scheme; use a local path, "
                         "http(s)://, s3:// or pipe:COMMAND")
    path = Path(text)
    if path.is_dir() or not path.suffix == ".json":
        return Location("local", str(path.resolve())), MANIFEST_NAME
    return Location("local", str(path.resolve().parent)), path.name


RetryHook = Callable[[str, str], None]
"""on_retry(url, what happened and what comes next)."""


def fetch(location: Location, name: str, options: RemoteOptions, *, size: int | None = None,
          sha256: str | None = None, on_retry: RetryHook | None = None) -> bytes:
    """All bytes of file `name`, checked against `size` and `sha256` when given (see the module
    docstring for retries). Raises RemoteError naming the URL."""
    url = location.describe(name)
    cached = _cache_path(options, name, sha256)
    if cached is not None and cached.is_file():
        data = cached.read_bytes()
        if (size is None or len(data) == size) and hashlib.sha256(data).hexdigest() == sha256:
            return data
        cached.unlink(missing_ok=True)  # damaged cache entry: fetch again
    data = _fetch_with_retries(location, name, url, options, size, sha256, on_retry)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, cached)  # several workers may race here: every copy is identical
    return data


def _cache_path(options: RemoteOptions, name: str, sha256: str | None) -> Path | None:
    if not options.cache_dir or not sha256:
        return None
    return Path(options.cache_dir) / f"{sha256}-{Path(name).name}"


def _fetch_with_retries(location: Location, name: str, url: str, options: RemoteOptions,
                        size: int | None, sha256: str | None, on_retry: RetryHook | None) -> bytes:
    buf = bytearray()
    digest = hashlib.sha256()
    failures = 0
    ranges = True
    while True:
        try:
            _stream_into(location, name, url, options, buf, digest, size, ranges)
            break
        except _NoRanges:
            ranges = False
        except _Transient as err:
            failures += 1
            if failures > options.retries:
                raise RemoteError(url, f"failed {failures} times, last: {err}; giving up "
                                       f"(data.remote.retries = {options.retries})") from None
            wait = min(options.backoff_s * 2 ** (failures - 1), 30.0)
            if on_retry is not None:
                on_retry(url, f"{err}; retry {failures}/{options.retries} in {wait:.1f} s at "
                              f"byte {len(buf)}")
            time.sleep(wait)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise RemoteError(url, "sha256 differs from the manifest (corrupted in storage or in "
                               "transit); republish the file")
    return bytes(buf)


def _stream_into(location: Location, name: str, url: str, options: RemoteOptions,
                 buf: bytearray, digest, size: int | None, ranges: bool) -> None:
    """Append the rest of the file to `buf` (updating `digest`); _Transient on a retryable
    failure (buf keeps what arrived intact), RemoteError on a permanent one."""
    from webdataset.gopen import Pipe  # gopen's subprocess stream (checks the exit status)

    if location.is_local:
        try:
            with open(location.local_path(name), "rb") as f:
                f.seek(len(buf))
                while chunk := f.read(_CHUNK):
                    _append(buf, digest, chunk, size, url)
        except FileNotFoundError:
            raise RemoteError(url, "is missing") from None
        _check_complete(buf, size, url)
        return
    held = len(buf)
    cmd, resumes = location.command(name, held if ranges else 0, options)
    skip = 0 if (resumes and ranges) else held
    with tempfile.TemporaryFile() as err_file:
        try:
            pipe = Pipe(cmd, mode="rb", bufsize=_CHUNK, shell=isinstance(cmd, str),
                        stderr=err_file, ignore_status=[])
        except FileNotFoundError:
            raise RemoteError(url, f"cannot run {cmd[0] if isinstance(cmd, list) else cmd!r} "
                                   "(not installed?)") from None
        try:
            while True:
                # the stream itself, not `pipe.read`: that one polls the command after each read
                # and raises once it has exited non-zero, discarding the chunk just read; a
                # command that wrote its bytes and failed before the first read would then lose
                # them all and the retry start again from byte 0. `close` checks the status.
                chunk = pipe.stream.read(_CHUNK)
                if not chunk:
                    break
                if skip:
                    cut = min(skip, len(chunk))
                    if bytes(chunk[:cut]) != bytes(buf[held - skip:held - skip + cut]):
                        raise _Transient("a restarted stream delivered different bytes")
                    skip -= cut
                    chunk = chunk[cut:]
                _append(buf, digest, chunk, size, url)
            pipe.close()
        except RemoteError:
            pipe.proc.kill()
            pipe.proc.wait()
            raise
        except OSError:  # gopen's Pipe.close: the command exited with a non-zero status
            pipe.proc.kill()
            status = pipe.proc.wait()
            err_file.seek(0)
            detail = " ".join(err_file.read().decode(errors="replace").split())[-300:]
            _classify(location, cmd, status, detail, url)
        except BaseException:
            pipe.proc.kill()
            pipe.proc.wait()
            raise
    if skip:
        raise _Transient(f"a restarted stream ended after {held - skip} bytes, before the "
                         f"{held} already held")
    _check_complete(buf, size, url)


def _append(buf: bytearray, digest, chunk: bytes, size: int | None, url: str) -> None:
    if size is not None and len(buf) + len(chunk) > size:
        raise RemoteError(url, f"is longer than the {size} bytes the manifest records (replaced "
                               "after the manifest was written?); republish the dataset")
    digest.update(chunk)
    buf += chunk


def _check_complete(buf: bytearray, size: int | None, url: str) -> None:
    if size is not None and len(buf) < size:
        raise RemoteError(url, f"is truncated: the stream ended cleanly after {len(buf)} of the "
                               f"{size} bytes the manifest records; republish the file")


def _classify(location: Location, cmd, status: int, detail: str, url: str) -> None:
    """Raise _Transient or RemoteError for a transport command that exited with `status`."""
    if location.kind == "http":
        if status == _CURL_NO_RANGES:
            raise _NoRanges()
        if status == _CURL_HTTP_ERROR:
            code = re.search(r"error:? (\d{3})", detail)
            http = int(code.group(1)) if code else None
            if http is not None and http not in _HTTP_TRANSIENT:
                raise RemoteError(url, f"HTTP {http} ({detail or 'curl exit 22'})")
        elif status in _CURL_PERMANENT:
            raise RemoteError(url, f"curl exit {status}: {detail}")
        raise _Transient(f"curl exit {status}" + (f": {detail}" if detail else ""))
    what = cmd if isinstance(cmd, str) else " ".join(cmd)
    if status == 127:
        raise RemoteError(url, f"command not found: {what!r} ({detail})")
    raise _Transient(f"{what!r} exited with status {status}" + (f": {detail}" if detail else ""))

