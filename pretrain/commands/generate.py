"""`mtp generate`: text generation, plain or self-speculative with the MTP modules/heads."""

from __future__ import annotations

import argparse
import sys

from pretrain.commands import non_negative_float, positive_float, positive_int
from pretrain.errors import UsageError
from pretrain.inference import DEFAULT_NEW_TOKENS


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
    p.add_argument("--max-new-tokens", type=positive_int,
                   help=f"tokens to generate per prompt (default: {DEFAULT_NEW_TOKENS}, fewer "
                        "where the model's context needs it)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=positive_float, default=1.0,
                   help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding with the MTP tail")
    p.add_argument("--topk", type=positive_int, default=1,
                   help="greedy speculative only: accept a draft within the main model's top k "
                        "(BPD's relaxation; k > 1 no longer reproduces greedy exactly)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--no-graphs", action="store_true",
                   help="run every decoding step eagerly (by default GPUs replay each greedy "
                        "step or speculative round as one captured device graph)")
    p.add_argument("--json", metavar="FILE", help="write outputs and statistics as JSON")
    p.set_defaults(func=run)


def _check_flags(args: argparse.Namespace) -> None:
    if args.top_p > 1:
        raise UsageError(f"--top-p {args.top_p} is not in (0, 1]; use e.g. --top-p 0.95")
    if args.topk > 1 and not args.speculative:
        raise UsageError(f"--topk {args.topk} relaxes the acceptance of speculative drafts; add "
                         "--speculative or drop --topk")
    if args.topk > 1 and args.temperature > 0:
        raise UsageError(f"--topk {args.topk} applies to greedy decoding only; drop it or use "
                         "--temperature 0")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file) as fh:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in fh if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--prompt-file {args.prompt_file} cannot be read "
                             f"({getattr(err, 'strerror', None) or err})") from None
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompt-file FILE"
                         + (f" ({args.prompt_file} holds no prompt)" if args.prompt_file else ""))
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.tokenizer import TextTokenizer
    from model.generation import generate, generate_speculative
    from model.generation.sampling import SamplingConfig
    from pretrain.inference import (
        check_output_file,
        fit_new_tokens,
        load_model,
        note,
        write_json,
    )

    _check_flags(args)
    prompts = _read_prompts(args)
    check_output_file(args.json)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    loaded = load_model(args.model, dtype)
    if loaded.tokenizer_path is None:
        raise UsageError(f"{args.model} comes with no tokenizer (tokenizer.model or "
                         "tokenizer.json: its dataset was gone when it was exported); export it "
                         "again while the dataset is present")
    depth = loaded.model.config.mtp.depth
    if args.speculative and depth == 0:
        raise UsageError(f"{args.model} has no MTP tail to draft with (exported without "
                         "--with-mtp, or trained with mtp.kind none); drop --speculative, or "
                         "export it again with --with-mtp")
    try:
        sp = TextTokenizer.from_file(loaded.tokenizer_path)
    except (OSError, RuntimeError, ValueError) as err:
        raise UsageError(f"{loaded.tokenizer_path} is not a readable tokenizer ({err}); export "
                         "the model again") from None
    ids = [sp.encode(p) for p in prompts]
    empty = [p for p, t in zip(prompts, ids) if not t]
    if empty:
        raise UsageError(f"the prompt {empty[0]!r} encodes to no tokens; give a non-empty prompt")
    notes: list[str] = []
    max_new = fit_new_tokens(notes, max(len(t) for t in ids), args.max_new_tokens,
                             loaded.model.config.model.max_seq_len,
                             depth if args.speculative else None)
    for text in notes:
        note("generate", text)
    sampling = SamplingConfig(args.temperature, args.top_p, args.seed)
    graphs = False if args.no_graphs else None  # None: graphs where supported
    if args.speculative:
        result = generate_speculative(loaded.model, ids, max_new, sampling, loaded.eos_id,
                                      loaded.pad_id, args.topk, graphs)
    else:
        result = generate(loaded.model, ids, max_new, sampling, loaded.eos_id, loaded.pad_id,
                          graphs)
    # A model's vocabulary may be padded beyond its tokenizer's pieces (model.vocab_size >= the
    # tokenizer's size); an id past them, which a barely trained model can still produce, is
    # shown as the tokenizer's unknown piece.
    texts = [sp.decode(sp.known(seq)) for seq in result.tokens]
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
        write_json(args.json, {"model": loaded.source, "prompts": prompts, "outputs": texts,
                               "tokens": result.tokens, **summary})
    return 0
