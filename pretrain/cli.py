"""The `mtp` console command (also `python -m pretrain`): one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from pretrain import exit_codes
from pretrain.launch import exit_with_launcher
from pretrain.quiet import quiet_third_party

# Subcommand modules under pretrain.commands, in the order `--help` lists them.
COMMANDS = ("prepare", "train", "export", "generate", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtp",
        description=(
            "Multi-Token Prediction pretraining: prepare token shards, train with "
            "DeepSpeed/megatron-core parallelism, export and generate."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pretrain.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
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
