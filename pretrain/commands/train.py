"""`mtp train`: pretraining with DeepSpeed (ZeRO), megatron-core TP and DeepSpeed PP."""

from __future__ import annotations

import argparse
import os
import sys

from pretrain import exit_codes
from pretrain.errors import CommandError, UsageError
from pretrain.launch import job_rank

EPILOG = f"""\
Launch it as one process (CPU demo), under torchrun / the deepspeed launcher, or with srun (one task
per GPU; see scripts/slurm/). The world size must be a multiple of parallel.tp × parallel.pp.

examples:
  mtp train --config configs/tiny-cpu.yaml
  mtp train --config configs/tiny-cpu.yaml train.steps=50 mtp.kind=parallel mtp.depth=3
  torchrun --nproc-per-node 8 -m pretrain train --config configs/gpt-350m.yaml parallel.tp=2 \\
      parallel.pp=2 --resume auto

{exit_codes.TRAIN_EPILOG}"""

# What gloo / NCCL / c10d say when a peer is gone or a collective timed out.
_COLLECTIVE_FAILURE = ("gloo", "nccl", "connection reset by peer", "connection closed by peer",
                       "timed out", "timeout", "broken pipe", "socket")


def _collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(k in text for k in _COLLECTIVE_FAILURE)


def _out_of_memory(err: BaseException, config: str, steps_done: int | None) -> str:
    """One paragraph for an out-of-memory error: where, what torch said, and what fits."""
    rank, world = job_rank(), os.environ.get("WORLD_SIZE", "1")
    where = f"in step {steps_done + 1}" if steps_done is not None else "during start-up"
    said = str(err).split(". If reserved")[0].strip()  # torch's allocator advice follows
    return (f"mtp train: rank {rank} of {world}: out of device memory {where} ({said}). This "
            f"config does not fit: `mtp plan --config {config} [the same overrides]` shows what "
            "a GPU holds. To fit: model.recompute=full, a smaller train.micro_batch_size (the "
            "global batch stays, with more accumulation), parallel.sequence_parallel=true with "
            "TP > 1, a higher parallel.zero_stage, or more GPUs; "
            "train.memory_snapshot_steps=N records what holds the peak. Nothing after the newest "
            "complete checkpoint is kept: change the config and restart with --resume auto.")


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
    from pretrain.checkpoint import CheckpointError, CheckpointSaveError
    from pretrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise UsageError(str(err), label="config error") from None
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    import torch

    from pretrain.trainer import NonFiniteError, RunDirLost, Trainer

    trainer = None
    started = False  # past start-up: a mistake met now may be one rank's alone
    try:
        trainer = Trainer(cfg, resume=args.resume, preempt=preempt)
        started = True
        return trainer.train().exit_code
    except CheckpointSaveError as err:
        # Each rank says what failed on it (the rank that hit the write error names the file).
        print(f"mtp train: checkpoint save failed: {err}", file=sys.stderr, flush=True)
        return exit_codes.SAVE_FAILED
    except RunDirLost as err:
        raise CommandError(str(err), exit_codes.SAVE_FAILED) from None
    except (ConfigError, CheckpointError) as err:
        raise UsageError(str(err), every_rank=not started) from None
    except ShardError as err:
        raise UsageError(err.describe("set data.skip_corrupt=true"), label="data error",
                         every_rank=not started) from None
    except NonFiniteError as err:
        raise CommandError(str(err), exit_codes.NONFINITE, label="stopped") from None
    except torch.OutOfMemoryError as err:
        print(_out_of_memory(err, args.config, trainer.step if started else None),
              file=sys.stderr, flush=True)
        return exit_codes.OUT_OF_MEMORY
    except RuntimeError as err:
        if not _collective_failure(err):
            raise
        import os

        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        step = f" after step {trainer.step}" if trainer is not None else " during start-up"
        detail = str(err).split(". This is typically")[0].strip()
        print(f"mtp train: rank {rank} of {world}: lost a peer{step}: a collective failed "
              f"({type(err).__name__}: {detail}). Another rank died (see its log, or the "
              f"launcher's report of which one exited first) or hung for longer than "
              f"train.collective_timeout_s = {cfg.train.collective_timeout_s} s. Nothing after "
              "the newest complete checkpoint is kept: restart the job with --resume auto.",
              file=sys.stderr, flush=True)
        return exit_codes.PEER_LOST
    finally:
        if trainer is not None:
            trainer.close()
