"""`mtp export`: a training checkpoint → Hugging Face Llama (main model only) + MTP draft tail."""

from __future__ import annotations

import argparse
import sys

from pretrain import exit_codes

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint as a Hugging Face Llama model (+ the MTP tail)",
        description="Gather a training checkpoint (any TP/PP/ZeRO layout) into the main model "
                    "alone — config.json, model.safetensors, tokenizer — loadable by "
                    "transformers' LlamaForCausalLM. The MTP modules are dropped, or written "
                    "beside it (mtp.safetensors + mtp_config.json) with --with-mtp for "
                    "self-speculative decoding.",
        epilog="examples:\n  mtp export runs/tiny-cpu --out exports/tiny\n"
               "  mtp export runs/gpt-350m/checkpoints/step_00020000 --out exports/350m "
               "--with-mtp --dtype bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT",
                   help="a run directory (newest complete checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    p.add_argument("--with-mtp", action="store_true",
                   help="also write the MTP tail (draft modules) into DIR")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="weights dtype (default: as trained — fp32 on CPU runs, bf16 on GPU runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pretrain.checkpoint import CheckpointError, resolve_checkpoint
    from pretrain.export.from_checkpoint import export_checkpoint

    def warn(text: str) -> None:
        print(f"mtp export: warning: {text}", file=sys.stderr)

    try:
        ref = resolve_checkpoint(args.checkpoint)
        print(f"mtp export: reading {ref.path}", file=sys.stderr)
        dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
        out = export_checkpoint(ref, args.out, with_mtp=args.with_mtp, dtype=dtype,
                                overwrite=args.overwrite, warn=warn)
    except (CheckpointError, ValueError, FileExistsError) as err:
        print(f"mtp export: error: {err}", file=sys.stderr)
        return exit_codes.USAGE
    print(f"exported step {ref.step} to {out}" + (" (with the MTP tail)" if args.with_mtp else ""))
    return 0
