"""`mtp plan`: the memory one GPU needs for a run, before launching it."""

from __future__ import annotations

import argparse
import json

from pretrain import exit_codes
from pretrain.errors import UsageError

EPILOG = """\
examples:
  mtp plan --config configs/llama3-8b.yaml --gpus 2 --gpu-memory 80
  mtp plan --config configs/llama3-70b.yaml --gpus 16 --gpu-memory 80 parallel.tp=8 parallel.pp=2

The estimate is for the pipeline stage that holds the most, as the run would execute on GPUs
(bf16 and torch.compile as the config resolves there). benchmarks/RESULTS.md sets estimates beside
measured peaks. `mtp train` prints the same estimate and warns before the first step when it
exceeds the card."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="memory per GPU of a run (parameters, gradients, optimizer, activations)",
        description="Estimate what one GPU holds for the config: parameters, gradients, "
                    "optimizer states, activations (for model.recompute and "
                    "parallel.sequence_parallel), the loss's working set and communication "
                    "buffers, and whether that fits a card.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs of the run (the world size; default: the GPUs visible here, or 1)")
    p.add_argument("--gpu-memory", type=float, metavar="GiB",
                   help="memory of one card (default: the visible GPU's; none on a CPU machine)")
    p.add_argument("--seq-len", type=int, metavar="T",
                   help="tokens per sample (default: the dataset's, else model.max_seq_len)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(func=run)


def _seq_len(cfg, given: int | None) -> int:
    if given is not None:
        return given
    from data_pipeline import load_manifest

    try:
        return load_manifest(cfg.data.path, check_files=False).seq_len
    except (OSError, ValueError):
        return cfg.model.max_seq_len


def run(args: argparse.Namespace) -> int:
    from model import accelerator
    from pretrain.config import ConfigError, load_config, validate_layout
    from pretrain.memory_plan import GIB, plan_for_run

    try:
        cfg = load_config(args.config, args.overrides)
        gpus = args.gpus if args.gpus is not None else max(1, accelerator.device_count())
        if gpus < 1:
            raise ConfigError(f"--gpus {gpus}: give the number of GPUs of the run (>= 1)")
        layout = validate_layout(cfg, gpus)
        seq_len = _seq_len(cfg, args.seq_len)
        if args.gpu_memory is not None and args.gpu_memory <= 0:
            raise ConfigError(f"--gpu-memory {args.gpu_memory}: give the card's memory in GiB")
        capacity = (args.gpu_memory * GIB if args.gpu_memory is not None
                    else accelerator.device_memory_bytes())
        plan = plan_for_run(cfg, layout, seq_len, capacity)
    except ConfigError as err:
        raise UsageError(str(err), label="config error") from None
    p = cfg.parallel
    print(f"{args.config}: {gpus} GPU(s) = TP {layout.tp} × PP {layout.pp} × DP {layout.dp}, "
          f"ZeRO {p.zero_stage}, sequence parallel {'on' if p.sequence_parallel else 'off'}, "
          f"recompute {cfg.model.recompute}, micro-batch {cfg.train.micro_batch_size} × "
          f"{seq_len} tokens, {plan.in_flight} in flight on stage {plan.stage}")
    print(plan.table())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpus": gpus, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                       "seq_len": seq_len, "stage": plan.stage, "in_flight": plan.in_flight,
                       "parts_bytes": plan.parts, "total_bytes": plan.total,
                       "capacity_bytes": plan.capacity, "fits": plan.fits},
                      fh, indent=1)
    return exit_codes.OK
