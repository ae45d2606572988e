"""The `mtp` console command (also `python -m pretrain`): one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

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


def _quiet_third_party() -> None:
    """Silence import-time notices that do not concern our users (no Transformer Engine/Apex is
    expected; megatron's CUDA_DEVICE_MAX_CONNECTIONS hint is for its own overlap path)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mtp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
