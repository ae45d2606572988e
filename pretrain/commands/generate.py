"""`mtp generate`: text generation, plain or self-speculative with the MTP modules/heads."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain import exit_codes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text (plain or self-speculative decoding)",
        description="Generate continuations of prompts with a KV cache. --speculative drafts "
                    "D tokens with the model's MTP tail and verifies them in one forward of the "
                    "main model: greedy output is identical to plain greedy decoding, sampled "
                    "output follows the main model's distribution exactly.",
        epilog="examples:\n  mtp generate runs/tiny-cpu/export --prompt 'def main(' --speculative\n"
               "  mtp generate runs/tiny-cpu --prompt 'import os' --temperature 0.8 --top-p 0.95 "
               "--speculative --json stats.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="an export directory (with --with-mtp for speculative decoding) or a "
                        "training run/checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: a batch)")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding with the MTP tail")
    p.add_argument("--topk", type=int, default=1,
                   help="greedy speculative only: accept a draft within the main model's top k "
                        "(BPD's relaxation; k > 1 no longer reproduces greedy exactly)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--no-graphs", action="store_true",
                   help="run every decoding step eagerly (by default GPUs replay each greedy "
                        "step or speculative round as one captured device graph)")
    p.add_argument("--json", metavar="FILE", help="write outputs and statistics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.tokenizer import TextTokenizer
    from model.generation import generate, generate_speculative
    from model.generation.sampling import SamplingConfig
    from pretrain.export.loading import load_for_inference

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as fh:
            prompts += [line.rstrip("\n").replace("\\n", "\n") for line in fh if line.strip()]
    if not prompts:
        print("mtp generate: error: give --prompt TEXT or --prompt-file FILE", file=sys.stderr)
        return exit_codes.USAGE
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        loaded = load_for_inference(args.model, dtype)
        if loaded.tokenizer_path is None:
            raise ValueError(f"{args.model} comes with no tokenizer (tokenizer.model or "
                             "tokenizer.json); export it with its dataset's tokenizer")
        sp = TextTokenizer.from_file(loaded.tokenizer_path)
        ids = [sp.encode(p) for p in prompts]
        sampling = SamplingConfig(args.temperature, args.top_p, args.seed)
        graphs = False if args.no_graphs else None  # None: graphs where supported
        if args.speculative:
            result = generate_speculative(loaded.model, ids, args.max_new_tokens, sampling,
                                          loaded.eos_id, loaded.pad_id, args.topk, graphs)
        else:
            result = generate(loaded.model, ids, args.max_new_tokens, sampling, loaded.eos_id,
                              loaded.pad_id, graphs)
    except (ValueError, OSError) as err:
        print(f"mtp generate: error: {err}", file=sys.stderr)
        return exit_codes.USAGE
    texts = [sp.decode(t) for t in result.tokens]
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{prompt}{text}")
    summary = result.to_dict()
    line = f"{summary['num_tokens']} tokens in {summary['seconds']:.2f} s " \
           f"({summary['tokens_per_second']:.1f} tokens/s)"
    if result.stats is not None:
        st = result.stats
        line += (f"; {st.mean_tokens_per_forward():.2f} tokens per main-model forward; "
                 f"acceptance by depth " + " ".join(f"{a:.2f}" for a in st.acceptance_rate()))
    print(line, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": loaded.source, "prompts": prompts, "outputs": texts,
                       "tokens": result.tokens, **summary}, fh, indent=1)
    return 0
