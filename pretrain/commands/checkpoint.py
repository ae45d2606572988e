"""`mtp checkpoint`: work on checkpoints offline (convert for another layout)."""

from __future__ import annotations

import argparse
import sys

from pretrain import exit_codes
from pretrain.errors import UsageError

EPILOG = """\
Every checkpoint resumes onto any layout as it is: `mtp train --resume auto` with another
parallel.tp / parallel.pp, world size or ZeRO stage reshards it on load (and says so). Converting
first makes that load cheaper when the TP size changes: each rank then reads its own shard.

examples:
  mtp checkpoint convert runs/llama3-8b --layout tp=1,dp=4,zero=3 --out runs/llama3-8b-dp4/ckpt
  mtp train --config configs/llama3-8b.yaml parallel.tp=1 parallel.zero_stage=3 \\
      run_dir=runs/llama3-8b-dp4 --resume runs/llama3-8b-dp4/ckpt"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="convert a checkpoint for another parallel layout",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser(
        "convert", help="write a checkpoint's state as whole shards of a target TP size",
        description="Read a checkpoint (a run directory: its newest complete one) and write it "
                    "for the target layout: the fp32 master weights and Adam moments as whole "
                    "shards of the target TP size, the trainer state and data position as they "
                    "were. The source is only read; a killed conversion leaves no output.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("checkpoint", metavar="RUN_OR_CKPT",
                   help="a run directory (newest complete checkpoint) or a checkpoint directory")
    c.add_argument("--layout", required=True, metavar="tp=N,pp=N,dp=N,zero=N",
                   help="the target layout; keys left out keep the checkpoint's")
    c.add_argument("--out", required=True, metavar="DIR",
                   help="the converted checkpoint's directory (must not exist)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.checkpoint import CheckpointError, resolve_checkpoint
    from pretrain.checkpoint_convert import convert, parse_layout
    from pretrain.config import ConfigError

    try:
        layout = parse_layout(args.layout)
        ref = resolve_checkpoint(args.checkpoint)

        def announce(source: dict, target: dict) -> None:
            print(f"mtp checkpoint: converting {ref.path} (step {ref.step}, {_describe(source)}) "
                  f"for {_describe(target)}", file=sys.stderr)

        def removed(path: Path) -> None:
            print(f"mtp checkpoint: removed {path}, left by a conversion that did not finish",
                  file=sys.stderr)

        target = convert(ref, Path(args.out), layout, progress=not args.no_progress,
                         announce=announce, removed=removed)
    except (ConfigError, CheckpointError) as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"--out {args.out}: {err.strerror or err}; choose a writable place "
                         "with room for the checkpoint") from None
    print(f"converted step {ref.step} to {args.out} for {_describe(target)}; resume with "
          f"--resume {args.out}")
    return exit_codes.OK


def _describe(layout: dict) -> str:
    return (f"TP {layout['tp']} × PP {layout['pp']} × DP {layout['dp']}, "
            f"ZeRO {layout['zero']}")
