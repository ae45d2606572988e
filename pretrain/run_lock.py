"""One writer per run directory: a training job holds RUN_DIR/job.lock before it writes anything
there, and a second job is refused while the first is alive (docs/DESIGN.md, "One writer per run
directory").

The lock directory holds numbered generation files, `gen-00000007.json`; the highest number
present is the lock's state: the record of the process holding it (host, boot id, pid namespace,
pid and the pid's start time, command, start time), or a release record. Every change creates the
next number exclusively: a private temporary file is written whole and then hard-linked to the
generation's name, and link(2) fails when the name exists (atomic on local filesystems and on NFS,
where exclusive creation by link is the classic lock primitive). So of any number of jobs racing
to take over the same stale lock exactly one creates the next number; the others find it there,
judge its (live) holder and refuse. Numbers are never reused: a generation file is removed only
by the creator of a higher one (superseded records) or by its own creator backing off, so the top
number only grows, and a racer acting on an old observation can only fail to create a taken
number or create one below the top, which it then sees and withdraws.

The holder refreshes its file's mtime every `heartbeat_s` from a daemon thread (a file touch: no
cost in the training step, no device sync). A lock is stale when its holder is known to be gone:
on the same machine (host name, boot id and pid namespace all equal) when no live process has the
recorded pid and start time (a pid can be reused, its start time cannot); on another machine
sharing the filesystem, where pids mean nothing, when the heartbeat has not moved for
`stale_after_s`, measured on the file server's clock (the mtime of a file written just now), not
on this host's. A holder on another machine whose heartbeat is recent is watched until it either
moves (alive: refused) or stops long enough (gone: taken over).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

LOCK_DIR = "job.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
_GENERATION = re.compile(r"^gen-(\d{8})\.json$")


class RunDirBusy(RuntimeError):
    """Another job holds the run directory (or could not be shown to be gone in time)."""


# ------------------------------------------------------------------ who is a process
def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    return fields[0], int(fields[19])


def _machine() -> dict:
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": boot.strip() if boot else None,
            "pid_ns": pid_ns}


def this_process() -> dict:
    """The record a holder writes: enough to tell whether it is alive and to name it."""
    stat = _proc_stat(os.getpid())
    job = next((f"{k}={os.environ[k]}" for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
                if k in os.environ), None)
    return {**_machine(), "pid": os.getpid(), "pid_start": stat[1] if stat else None,
            "started": time.time(), "job": job, "command": " ".join(sys.argv)[:300]}


def _same_machine(a: dict, b: dict) -> bool:
    keys = ("host", "boot_id", "pid_ns")
    return all(a.get(k) is not None and a.get(k) == b.get(k) for k in keys)


def _same_process(a: dict, b: dict) -> bool:
    return _same_machine(a, b) and (a.get("pid"), a.get("pid_start")) == (b.get("pid"),
                                                                           b.get("pid_start"))


def _alive_here(record: dict) -> bool:
    """Is the recorded process (of this machine) still running? A zombie has finished."""
    stat = _proc_stat(int(record["pid"]))
    if stat is not None:
        return stat[0] != "Z" and stat[1] == record.get("pid_start")
    try:
        os.kill(int(record["pid"]), 0)  # no /proc: the pid alone (may be a reused one)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return record.get("pid_start") is None


def process_ended(record: dict) -> bool:
    """Whether the process of a `this_process()` record ran on this machine and has ended (a
    record of another machine, or of one still running, is not known to have ended)."""
    return _same_machine(record, _machine()) and not _alive_here(record)


def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    job = f", {record['job']}" if record.get("job") else ""
    return (f"pid {record.get('pid')} on {record.get('host')}{job}, started {started} "
            f"({record.get('command', '?')})")


# ------------------------------------------------------------------ the lock
class RunLock:
    """`RunLock(run_dir).acquire()` or RunDirBusy; `lost()` before writing; `release()` at the
    end. One process per job takes it (global rank 0)."""

    def __init__(self, run_dir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / LOCK_DIR
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.generation: int | None = None
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        assert self.generation is not None
        return self._file(self.generation)

    def _file(self, generation: int) -> Path:
        return self.dir / f"gen-{generation:08d}.json"

    # -------------------------------------------------------------- files
    def _generations(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_GENERATION.match, names) if m)

    def _read(self, generation: int) -> tuple[dict, float] | None:
        """(record, mtime) of a generation; None if it vanished meanwhile. An unreadable record
        (written by something else) counts as a holder known only by its heartbeat."""
        path = self._file(generation)
        try:
            mtime = path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), mtime

    def _write_temp(self, record: dict) -> Path:
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "w") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _create(self, generation: int, record: dict) -> bool:
        """Create generation `generation` holding `record`, whole, unless it exists."""
        tmp = self._write_temp(record)
        try:
            os.link(tmp, self._file(generation))
            return True
        except FileExistsError:
            return False
        except OSError as err:
            # NFS: a retransmitted LINK can report an error for a link that was made; the link
            # count of our private file tells.
            if tmp.stat().st_nlink == 2:
                return True
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV):
                raise
        finally:
            tmp.unlink(missing_ok=True)
        return self._create_exclusive(generation, record)

    def _create_exclusive(self, generation: int, record: dict) -> bool:
        """For filesystems without hard links: O_EXCL creation, then the content. A reader that
        comes in between sees an empty record with a fresh mtime: a holder it watches, and
        reads again."""
        try:
            fd = os.open(self._file(generation), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _server_now(self) -> float:
        """The filesystem's clock: heartbeats are its mtimes, so ages are measured on it."""
        tmp = self._write_temp({})
        try:
            return tmp.stat().st_mtime
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_below(self, generation: int) -> None:
        for g in self._generations():
            if g < generation:
                self._file(g).unlink(missing_ok=True)

    # -------------------------------------------------------------- acquire / release
    def acquire(self, wait_s: float = STALE_AFTER_S,
                notify: Callable[[str], None] | None = None) -> RunLock:
        """Take the lock, taking over a stale one (`notify` gets the message saying whose). A
        holder on another machine with a recent heartbeat is watched for up to `wait_s`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        me = this_process()
        deadline = time.monotonic() + wait_s
        watched: tuple[int, float] | None = None
        while True:
            gens = self._generations()
            top = gens[-1] if gens else 0
            seen = self._read(top) if gens else None
            if gens and seen is None:
                continue  # superseded while we looked: look again
            takeover = None
            if seen is not None and not seen[0].get("free"):
                record, mtime = seen
                if _same_process(record, me):
                    pass  # an earlier trainer of this very process did not release it
                elif _same_machine(record, me):
                    if _alive_here(record):
                        raise RunDirBusy(self._busy(record, "the process is running"))
                    takeover = f"{describe(record)}: that process is gone"
                else:
                    age = self._server_now() - mtime
                    if age > self.stale_after_s:
                        takeover = (f"{describe(record)}: its heartbeat stopped {age:.0f} s ago "
                                    f"(> {self.stale_after_s:.0f} s)")
                    elif watched is not None and watched[0] == top and watched[1] != mtime:
                        raise RunDirBusy(self._busy(record, f"its heartbeat is {age:.0f} s old "
                                                            "and moving"))
                    elif time.monotonic() > deadline:
                        raise RunDirBusy(self._busy(
                            record, f"its heartbeat is {age:.0f} s old; it counts as gone after "
                                    f"{self.stale_after_s:.0f} s without one"))
                    else:
                        watched = (top, mtime)
                        time.sleep(min(1.0, self.heartbeat_s / 2))
                        continue
            if not self._create(top + 1, me):
                continue  # another job changed the lock first: judge its record
            if self._generations()[-1] != top + 1:  # a higher one appeared: not ours after all
                self._file(top + 1).unlink(missing_ok=True)
                continue
            self.generation, self._record = top + 1, me
            self._remove_below(top + 1)
            if takeover and notify is not None:
                notify(f"took over the lock {self.dir} from {takeover}")
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="mtp-run-lock-heartbeat",
                                            daemon=True)
            self._thread.start()
            return self

    def _busy(self, record: dict, why: str) -> str:
        return (f"run directory {self.run_dir} is in use by another job: {describe(record)}; "
                f"{why}. Wait for that job to end or stop it, or use another run directory; if "
                f"it is gone for certain, delete {self.dir}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)  # mtime := now (the server's clock on NFS)
            except FileNotFoundError:
                return  # superseded and removed: lost() says so
            except OSError:
                continue  # a transient I/O error: the next beat retries

    def lost(self) -> str | None:
        """Why this job may no longer write the run directory (None while it holds the lock)."""
        if self.generation is None:
            return f"the lock {self.dir} is not held"
        gens = self._generations()
        if not gens or gens[-1] != self.generation:
            newer = self._read(gens[-1]) if gens else None
            by = describe(newer[0]) if newer and not newer[0].get("free") else "another job"
            return f"the lock {self.dir} was taken over by {by}"
        return None

    def release(self) -> None:
        """Leave a release record (if the lock is still ours) and stop the heartbeat."""
        if self.generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        gen, self.generation = self.generation, None
        try:
            gens = self._generations()
            if gens and gens[-1] == gen and self._create(
                    gen + 1, {"free": True, "released": time.time(), "by": self._record}):
                self._remove_below(gen + 1)
        except OSError:
            pass  # the holder's process ends next: the lock is stale and taken over then
