"""`mtp export`: a training checkpoint → Hugging Face Llama (main model only) + MTP draft tail."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.errors import UsageError

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


def _check_out(out: Path, ref, overwrite: bool) -> None:
    """Refuse an --out that would lose something: a non-empty directory without --overwrite,
    and, even with it, anything that is not an earlier export (a run directory, the checkpoint
    being exported, a directory of other files): --overwrite replaces the whole directory."""
    from pretrain.checkpoint import complete_checkpoints
    from pretrain.export.files import METADATA_FILE

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory path")
    try:
        holds_source = ref.path.resolve().is_relative_to(out.resolve())
    except OSError:
        holds_source = False
    if holds_source:
        raise UsageError(f"--out {out} holds the checkpoint being exported ({ref.path}); export "
                         f"into a directory of its own, e.g. --out {ref.root.parent / 'export'}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if complete_checkpoints(out / "checkpoints") or complete_checkpoints(out):
        raise UsageError(f"--out {out} holds training checkpoints; export into a directory of "
                         "its own")
    is_export = (out / "config.json").is_file() or (out / METADATA_FILE).is_file()
    if not overwrite:
        what = "an earlier export" if is_export else "other files"
        raise UsageError(f"--out {out} is not empty (it holds {what}); add --overwrite to "
                         "replace it, or choose a new directory")
    if not is_export:
        raise UsageError(f"--out {out} holds files that are not an export (no config.json or "
                         f"{METADATA_FILE}); --overwrite replaces only earlier exports: choose "
                         "a new directory, or empty this one yourself")


def run(args: argparse.Namespace) -> int:
    import torch

    from pretrain.checkpoint import CheckpointError, resolve_checkpoint
    from pretrain.export.from_checkpoint import export_checkpoint

    def warn(text: str) -> None:
        print(f"mtp export: warning: {text}", file=sys.stderr)

    try:
        ref = resolve_checkpoint(args.checkpoint)
    except CheckpointError as err:
        raise UsageError(f"{err}; give a run directory or a checkpoint directory "
                         "(RUN/checkpoints/step_*) whose save finished") from None
    _check_out(Path(args.out), ref, args.overwrite)
    print(f"mtp export: reading {ref.path}", file=sys.stderr)
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    try:
        out = export_checkpoint(ref, args.out, with_mtp=args.with_mtp, dtype=dtype,
                                overwrite=args.overwrite, warn=warn)
    except (CheckpointError, ValueError) as err:  # a damaged checkpoint, --with-mtp without a tail
        raise UsageError(str(err)) from None
    print(f"exported step {ref.step} to {out}" + (" (with the MTP tail)" if args.with_mtp else ""))
    return 0
