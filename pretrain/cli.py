"""The `mtp` console command (also `python -m pretrain`): one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pretrain import exit_codes
from pretrain.errors import CommandError, UsageError
from pretrain.launch import exit_with_launcher, job_rank
from pretrain.quiet import quiet_third_party

# Subcommand modules under pretrain.commands, in the order `--help` lists them.
COMMANDS = ("prepare", "train", "plan", "checkpoint", "export", "generate", "eval")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (and once per job, like every other mistake)."""

    def error(self, message: str):
        _report(self.prog, UsageError(f"{message} (see `{self.prog} --help`)"))
        raise SystemExit(exit_codes.USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mtp",
        description=(
            "Multi-Token Prediction pretraining: prepare token shards, train with "
            "DeepSpeed/megatron-core parallelism, export and generate."
        ),
        epilog="Mistakes in the input (paths, flags, configs, data) are reported as one line "
               f"naming the fix, with exit code {exit_codes.USAGE}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pretrain.commands.{name}").register(sub)
    parser.set_defaults(subparsers=sub.choices)
    return parser


def _report(prog: str, err: CommandError) -> None:
    """One line on stderr, from one process of the job: every rank of a torchrun/srun job runs
    the command and meets a shared mistake alike, so rank 0 speaks for them all; a mistake of
    one rank only is reported by that rank, naming it."""
    rank = job_rank()
    if err.every_rank and rank != 0:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"rank {rank}: " if not err.every_rank and world > 1 else ""
    # one line, whatever the message's own layout (spaces inside a line are left alone)
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"{prog}: {err.label}: {where}{message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand, whose --help lists what it takes
        args.subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except CommandError as err:
        _report(f"mtp {args.command}", err)
        return err.exit_code
    except KeyboardInterrupt:
        print("mtp: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


def _release_process_groups() -> None:
    """Shut the process groups down before the interpreter exits. Left to interpreter teardown,
    gloo's worker threads can be destroyed while still joinable, and the C++ runtime then aborts a
    rank that had finished cleanly ("terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry() -> None:
    """The process entry point (console script and `python -m pretrain`). Unlike `main`, which
    tests call repeatedly inside one live world, it owns the process and so its process groups.
    They are released after a clean finish (0) or a checkpointed stop (75) only: after a failed
    collective (exit 5) the peers are gone and a shutdown could block. A worker of a launcher
    (torchrun, srun) dies with it rather than train on as an orphan."""
    exit_with_launcher()
    code = main()
    if code in (exit_codes.OK, exit_codes.PREEMPTED):
        _release_process_groups()
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
