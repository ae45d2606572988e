"""Harness for real multi-process distributed tests on CPU (gloo).

`run_world(fn, world_size, *args)` starts `world_size` fresh processes, initialises a gloo world in
each, calls `fn(rank, world_size, *args)` and returns every rank's (picklable) result, in rank order.

The processes are forked from a forkserver that has imported torch and the trainer once per test
session: a rank's imports (torch, DeepSpeed, megatron-core: ~5 s of CPU each) cost more than its
work at the tests' sizes, and a world of 8 on two cores paid them 8 times over. The server runs
no test code, so every rank still starts from clean module state.

It never hangs: ranks report through a queue, the parent waits with a deadline and, on a timeout
or as soon as one rank fails, kills the whole world and raises with the failing rank's own
traceback. Ranks never synchronise in a `finally` (a dead peer would hang them).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

# Imported once in the forkserver (single-threaded after these imports, so forking it is safe).
PRELOAD = ["torch", "pretrain.trainer"]


class DistributedTestError(AssertionError):
    pass


class _ParentFd:
    """One of this process's file descriptors, duplicated into the rank when it starts. Forkserver
    children otherwise write to the server's stdout and stderr (those of the test that started
    it), not to the current test's, which pytest captures and shows when the test fails."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _detach, (DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _entry(fn, rank, world_size, port, timeout_s, args, results, stdio) -> None:
    for target, fd in zip((1, 2), stdio):
        os.dup2(fd, target)
        os.close(fd)
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
            DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        try:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s))
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e):
                raise
            # Another process took the port between free_port() and rank 0's listen.
            results.put((rank, PORT_TAKEN, traceback.format_exc()))
            return
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))


PORT_TAKEN = "port-taken"
PORT_ATTEMPTS = 3


class _PortTaken(Exception):
    pass


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on a fresh gloo world; return results by rank. A world
    whose rendezvous port was taken by another process before rank 0 could listen on it (nothing
    of `fn` has run) starts again on a new port, up to PORT_ATTEMPTS times."""
    for _ in range(PORT_ATTEMPTS):
        try:
            return _run_world_once(fn, world_size, args, timeout_s)
        except _PortTaken as e:
            taken = e
    raise DistributedTestError(f"no free rendezvous port in {PORT_ATTEMPTS} attempts:\n{taken}")


def _run_world_once(fn, world_size: int, args: tuple, timeout_s: float) -> list[Any]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    results = ctx.Queue()
    from pretrain.launch import free_port

    port = free_port()
    # Collectives time out a little before the harness does, so a stuck rank usually explains
    # itself with gloo's own error before it is killed.
    coll_timeout = max(10.0, timeout_s - 15)
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, coll_timeout, args, results,
                                         (_ParentFd(1), _ParentFd(2))), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise DistributedTestError(
                    f"distributed test timed out after {timeout_s:.0f} s; ranks {missing} did not "
                    "finish (hang or deadlock)")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None) and r not in outputs]
                if dead:
                    # Give the dying rank's traceback a moment to arrive through the queue.
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedTestError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                            "without a traceback") from None
                else:
                    continue
            if status == PORT_TAKEN:
                raise _PortTaken(payload)
            if status == "error":
                raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{payload}")
            outputs[rank] = payload
    finally:
        # After a success the ranks are exiting on their own; after a failure nobody waits for
        # them, since a peer may be stuck in a collective.
        grace = 10.0 if len(outputs) == world_size else 0.0
        for p in procs:
            p.join(timeout=grace)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [outputs[r] for r in range(world_size)]
