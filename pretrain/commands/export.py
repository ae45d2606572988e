"""`mtp export`: a training checkpoint → Hugging Face Llama (main model only) + MTP draft tail."""

from __future__ import annotations

import argparse
import sys

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

    from data_pipeline import load_manifest
    from model.hf_export import export_main_model
    from pretrain.checkpoint import CheckpointError, resolve_checkpoint
    from pretrain.checkpoint_export import full_state_dict_from_checkpoint

    try:
        ref = resolve_checkpoint(args.checkpoint)
        print(f"mtp export: reading {ref.path}", file=sys.stderr)
        cfg, full = full_state_dict_from_checkpoint(ref)
        if args.with_mtp and cfg.mtp.kind == "none":
            raise ValueError("--with-mtp: this run trained no MTP tail (mtp.kind = 'none')")
        tokenizer, special = None, None
        marker = ref.marker()
        try:
            manifest = load_manifest(marker["manifest"], check_files=False)
            tokenizer, special = manifest.tokenizer_path, manifest.special_ids
        except (OSError, ValueError) as err:
            print(f"mtp export: warning: dataset manifest unavailable ({err}); exporting without "
                  "a tokenizer", file=sys.stderr)
        dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
        out = export_main_model(
            args.out, full, cfg.decoder, tokenizer_model_path=tokenizer, dtype=dtype,
            special_token_ids=special, overwrite=args.overwrite, include_mtp=args.with_mtp,
            metadata={"checkpoint": str(ref.path), "step": ref.step, "run_dir": cfg.run_dir})
    except (CheckpointError, ValueError, FileExistsError) as err:
        print(f"mtp export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {ref.step} to {out}" + (" (with the MTP tail)" if args.with_mtp else ""))
    return 0
