"""`mtp eval`: validation loss and accuracy per depth, and real draft acceptance, on held-out
shards."""

from __future__ import annotations

import argparse
import sys

from pretrain.commands import positive_int
from pretrain.errors import UsageError
from pretrain.inference import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_LEN


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="validation loss per depth and real draft acceptance on held-out shards",
        description="Teacher-forced loss and top-1 accuracy of every depth on the dataset's "
                    "validation split, then self-speculative greedy decoding from held-out "
                    "prompts: acceptance per draft depth and mean tokens per main-model forward "
                    "(drafts judged against the main model's own continuation).",
        epilog="example:\n  mtp eval runs/tiny-cpu --data data/stdlib-tiny --json eval.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a run/checkpoint or export directory")
    p.add_argument("--data", required=True, help="dataset directory (mtp prepare)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--batches", type=positive_int, default=20,
                   help="loss batches (of --batch-size; default: 20)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="default: 8")
    p.add_argument("--prompts", type=positive_int, default=32,
                   help="prompts for the acceptance run (default: 32)")
    p.add_argument("--prompt-len", type=positive_int,
                   help=f"prompt tokens (default: {DEFAULT_PROMPT_LEN}, fewer where the model's "
                        "context needs it)")
    p.add_argument("--new-tokens", type=positive_int,
                   help=f"tokens decoded after each prompt (default: {DEFAULT_NEW_TOKENS}, fewer "
                        "where the model's context needs it)")
    p.add_argument("--acceptance-batch-size", type=positive_int, default=16,
                   help="prompts decoded together per request of the acceptance run (default: 16)")
    p.add_argument("--draft-vocab", type=_sizes, default=[], metavar="K[,K...]",
                   help="also measure the acceptance of drafts over only the K most frequent "
                        "tokens of --data's training split, for each K (what a reduced draft "
                        "vocabulary costs; `mtp generate --draft-vocab`)")
    p.add_argument("--draft-tokens", type=_sizes, default=[], metavar="N[,N...]",
                   help="also measure the acceptance with N drafts a round, for each N (more "
                        "than the depth chains the last DeepSeek module; `mtp generate "
                        "--draft-tokens`)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="skip corrupt or missing shards of the split (counted and reported) "
                        "instead of stopping")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=run)


def _sizes(text: str) -> list[int]:
    """--draft-vocab, --draft-tokens: comma-separated positive integers."""
    try:
        sizes = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers "
                                         "(e.g. 2048,4096)") from None
    if any(k < 1 for k in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return sizes


def _shard_error(err) -> UsageError:
    return UsageError(err.describe("add --skip-corrupt"), label="data error")


def _check_data(model_cfg, manifest, split: str) -> None:
    """What the loader or the model would otherwise fail on deep inside, said up front."""
    if manifest.num_samples(split) == 0:
        raise UsageError(f"--data {manifest.root} has no samples in its {split} split (built with "
                         "--val-fraction 0?); use --split train or rebuild it with "
                         "--val-fraction > 0")
    if manifest.vocab_size > model_cfg.model.vocab_size:
        raise UsageError(f"--data {manifest.root} was tokenized with {manifest.vocab_size} tokens "
                         f"but the model has model.vocab_size = {model_cfg.model.vocab_size}; "
                         "evaluate on data built with the model's own tokenizer")
    if manifest.seq_len > model_cfg.model.max_seq_len:
        raise UsageError(f"--data {manifest.root} has windows of seq_len {manifest.seq_len}, more "
                         f"than the model's model.max_seq_len = {model_cfg.model.max_seq_len}; "
                         "evaluate on data built with --seq-len "
                         f"{model_cfg.model.max_seq_len} or less")
    if model_cfg.mtp.depth > manifest.max_depth:
        raise UsageError(f"the model predicts {model_cfg.mtp.depth} extra tokens (mtp.depth) but "
                         f"--data {manifest.root} was built for --max-depth "
                         f"{manifest.max_depth}; rebuild it with --max-depth "
                         f"{model_cfg.mtp.depth}")


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline import ShardError, load_manifest
    from model.generation import DecodingEngine
    from model.generation.acceptance import real_acceptance
    from model.generation.drafters import check_drafts
    from model.mtp.objective import objective_class
    from pretrain.config import DataConfig
    from pretrain.data_loading import make_loader
    from pretrain.inference import (
        check_output_file,
        draft_vocab_ids,
        fit_prompt_and_new_tokens,
        load_model,
        note,
        write_json,
    )

    check_output_file(args.json)
    try:
        # Shards are checked by the loader, for the split evaluated only.
        manifest = load_manifest(args.data, check_files=False)
    except ValueError as err:
        raise UsageError(f"--data: {err}") from None
    loaded = load_model(args.model)
    model = loaded.model
    depth = model.config.mtp.depth
    _check_data(model.config, manifest, args.split)
    for flag, given in (("--draft-vocab", args.draft_vocab), ("--draft-tokens", args.draft_tokens)):
        if given and depth == 0:
            raise UsageError(f"{args.model} has no MTP tail to draft with; drop {flag}")
    for n in args.draft_tokens:
        try:
            check_drafts(objective_class(model.config.mtp.kind).drafter, depth, n)
        except ValueError as err:
            raise UsageError(f"--draft-tokens {n}: {err}") from None
    draft_vocabs = (draft_vocab_ids(manifest, model.config.model.vocab_size, args.draft_vocab,
                                    "--data") if args.draft_vocab else [])
    prompt_len, new_tokens, notes = args.prompt_len, args.new_tokens, []
    if depth > 0:
        prompt_len, new_tokens = fit_prompt_and_new_tokens(
            notes, prompt_len, new_tokens, model.config.model.max_seq_len,
            max([depth, *args.draft_tokens]), manifest.seq_len)
    try:
        loader = make_loader(DataConfig(path=args.data, skip_corrupt=args.skip_corrupt),
                             "validation", dp_rank=0, dp_size=1, batch_size=args.batch_size,
                             seed=0, depth=depth, split=args.split, shuffle=False)
    except ShardError as err:
        raise _shard_error(err) from None
    except ValueError:  # --skip-corrupt, and every shard of the split is corrupt
        bad = ", ".join(e.shard for e in manifest.check_shard_sizes(args.split))
        raise UsageError(f"--data {manifest.root}: no usable shard in its {args.split} split "
                         f"(corrupt or missing: {bad}); rebuild the dataset with `mtp prepare "
                         "--overwrite`", label="data error") from None

    device = model.embedding.output_weight.device
    sums = torch.zeros(2, depth + 1, dtype=torch.float64)
    prompts: list[list[int]] = []
    n = 0
    try:
        with torch.no_grad():
            for batch in loader:
                if n < args.batches:
                    out = model(batch["input_ids"].to(device), batch["labels"].to(device),
                                batch["loss_mask"].to(device), mtp_weight=0.0)
                    sums[0] += out.depth_loss.double().cpu()
                    sums[1] += out.depth_accuracy.double().cpu()
                    n += 1
                for row in batch["input_ids"]:
                    if len(prompts) < args.prompts:
                        prompts.append(row[:prompt_len].tolist())
                if n >= args.batches and len(prompts) >= args.prompts:
                    break
    except ShardError as err:
        raise _shard_error(err) from None
    skipped = loader.num_skipped_samples
    for name, problem in sorted(loader.corrupt_shards.items()):
        print(f"mtp eval: warning: skipped corrupt shard {name} ({problem})", file=sys.stderr)
    if args.skip_corrupt:
        note("eval", f"{skipped} samples of the {args.split} split skipped in corrupt shards")
    if n == 0:
        raise UsageError(f"--data {manifest.root}: no {args.split} batch could be read (every "
                         f"shard corrupt?); rebuild the dataset with `mtp prepare --overwrite`",
                         label="data error")
    result = {"model": loaded.source, "data": str(manifest.path), "split": args.split,
              "batches": n, "skipped_samples": skipped,
              "loss_per_depth": (sums[0] / n).tolist(), "accuracy_per_depth": (sums[1] / n).tolist()}
    print("loss per depth: " + " ".join(f"{x:.4f}" for x in result["loss_per_depth"]))
    print("teacher-forced accuracy per depth: " + " ".join(f"{x:.3f}" for x in result["accuracy_per_depth"]))
    if depth > 0:
        for text in notes:
            note("eval", text)

        def measure(label: str, **engine) -> dict:
            st = real_acceptance(DecodingEngine(model, **engine), prompts, new_tokens,
                                 batch_size=args.acceptance_batch_size)
            print(f"{label}: " + " ".join(f"{x:.3f}" for x in st.acceptance_rate())
                  + f"; mean tokens per forward {st.mean_tokens_per_forward():.2f}")
            return st.to_dict()

        result.update(prompt_len=prompt_len, new_tokens=new_tokens,
                      acceptance=measure("real acceptance per depth"))
        variants = {  # result key → {name: (printed label, engine options)}
            "acceptance_by_draft_vocab": {
                str(k): (f"  drafts over the {k} most frequent tokens", {"draft_vocab": ids})
                for k, ids in zip(args.draft_vocab, draft_vocabs)},
            "acceptance_by_draft_tokens": {
                str(n): (f"  {n} drafts a round", {"draft_tokens": n})
                for n in args.draft_tokens}}
        for key, runs in variants.items():
            if runs:
                result[key] = {name: measure(label, **engine)
                               for name, (label, engine) in runs.items()}
    if args.json:
        write_json(args.json, result)
    return 0
