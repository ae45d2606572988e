"""`mtp eval`: validation loss and accuracy per depth, and real draft acceptance, on held-out
shards."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain import exit_codes


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
    p.add_argument("--batches", type=int, default=20, help="loss batches (of --batch-size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32, help="prompts for the acceptance run")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--acceptance-batch-size", type=int, default=16,
                   help="prompts decoded together per request of the acceptance run")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline import load_manifest
    from model.generation import DecodingEngine
    from model.generation.acceptance import real_acceptance
    from pretrain.config import DataConfig
    from pretrain.data_loading import make_loader
    from pretrain.export.loading import load_for_inference

    if args.acceptance_batch_size < 1:
        print(f"mtp eval: error: --acceptance-batch-size {args.acceptance_batch_size} must be "
              ">= 1", file=sys.stderr)
        return exit_codes.USAGE
    try:
        loaded = load_for_inference(args.model)
        model = loaded.model
        depth = model.config.mtp.depth
        manifest = load_manifest(args.data)
        loader = make_loader(DataConfig(path=args.data), "validation", dp_rank=0, dp_size=1,
                             batch_size=args.batch_size, seed=0, depth=depth, split=args.split,
                             shuffle=False)
    except (ValueError, OSError) as err:
        print(f"mtp eval: error: {err}", file=sys.stderr)
        return exit_codes.USAGE
    device = model.embedding.output_weight.device
    sums = torch.zeros(2, depth + 1, dtype=torch.float64)
    prompts: list[list[int]] = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i < args.batches:
                out = model(batch["input_ids"].to(device), batch["labels"].to(device),
                            batch["loss_mask"].to(device), mtp_weight=0.0)
                sums[0] += out.depth_loss.double().cpu()
                sums[1] += out.depth_accuracy.double().cpu()
            for row in batch["input_ids"]:
                if len(prompts) < args.prompts:
                    prompts.append(row[: args.prompt_len].tolist())
            if i + 1 >= args.batches and len(prompts) >= args.prompts:
                break
    n = min(args.batches, i + 1)
    result = {"model": loaded.source, "data": str(manifest.path), "split": args.split,
              "loss_per_depth": (sums[0] / n).tolist(), "accuracy_per_depth": (sums[1] / n).tolist()}
    print("loss per depth: " + " ".join(f"{x:.4f}" for x in result["loss_per_depth"]))
    print("teacher-forced accuracy per depth: " + " ".join(f"{x:.3f}" for x in result["accuracy_per_depth"]))
    if depth > 0:
        st = real_acceptance(DecodingEngine(model), prompts, args.new_tokens,
                             batch_size=args.acceptance_batch_size)
        result["acceptance"] = st.to_dict()
        print("real acceptance per depth: " + " ".join(f"{x:.3f}" for x in st.acceptance_rate())
              + f"; mean tokens per forward {st.mean_tokens_per_forward():.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0
