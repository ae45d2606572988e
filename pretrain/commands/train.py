"""`mtp train`: pretraining with DeepSpeed (ZeRO), megatron-core TP and DeepSpeed PP."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
Launch it as one process (CPU demo), under torchrun / the deepspeed launcher, or with srun (one task
per GPU; see scripts/slurm/). The world size must be a multiple of parallel.tp × parallel.pp.

examples:
  mtp train --config configs/tiny-cpu.yaml
  mtp train --config configs/tiny-cpu.yaml train.steps=50 mtp.kind=parallel mtp.depth=3
  torchrun --nproc-per-node 8 -m pretrain train --config configs/gpt-350m.yaml parallel.tp=2 \\
      parallel.pp=2 --resume auto

exit codes: 0 done; 2 bad config or input (nothing was trained); 3 non-finite loss with
train.nonfinite=stop; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue and
resume with --resume auto)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="pretrain a model (MTP objectives, TP/PP/ZeRO, exact resume)",
        description="Train the MTP decoder described by a YAML config. Every config key can be "
                    "overridden as section.key=value (YAML syntax for the value). The resolved "
                    "config is written to RUN_DIR/config.yaml.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=100 parallel.tp=2")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': continue from the newest complete checkpoint in RUN_DIR if any; "
                        "PATH: a checkpoint directory or run directory")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit without training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pretrain.preemption import PreemptionFlag

    # First thing: a SLURM signal during the (long) start-up must not kill the job.
    preempt = PreemptionFlag().install()
    from data_pipeline import ShardError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"mtp train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    from pretrain.trainer import NonFiniteError, Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume, preempt=preempt)
        return trainer.train().exit_code
    except (ConfigError, CheckpointError) as err:
        print(f"mtp train: error: {err}", file=sys.stderr)
        return 2
    except ShardError as err:
        print(f"mtp train: data error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"mtp train: {err}", file=sys.stderr)
        return 3
