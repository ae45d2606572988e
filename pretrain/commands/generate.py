"""`mtp generate`: text generation, plain or self-speculative with the MTP modules/heads."""

from __future__ import annotations

import argparse
import sys

from pretrain.commands import non_negative_float, positive_float, positive_int
from pretrain.errors import UsageError
from pretrain.inference import DEFAULT_NEW_TOKENS, DRAFT_COUNT_TOKENS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text (plain or self-speculative decoding)",
        description="Generate continuations of prompts with a KV cache. --speculative drafts "
                    "tokens with the model's MTP tail and verifies them in one forward of the "
                    "main model: greedy output is identical to plain greedy decoding, sampled "
                    "output follows the main model's distribution exactly.",
        epilog="examples:\n  mtp generate runs/tiny-cpu/export --prompt 'def main(' --speculative\n"
               "  mtp generate runs/tiny-cpu --prompt 'import os' --temperature 0.8 --top-p 0.95 "
               "--speculative --json stats.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="an export directory (with --with-mtp for speculative decoding) or a "
                        "training run/checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line (\\n in a line is a newline)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts decoded together per request (default: all at once); requests "
                        "run one after another on the same engine")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help=f"tokens to generate per prompt (default: {DEFAULT_NEW_TOKENS}, fewer "
                        "where the model's context needs it)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=positive_float, default=1.0,
                   help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (every request)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--speculative", action="store_true",
                      help="self-speculative decoding with the MTP tail")
    mode.add_argument("--compare", action="store_true",
                      help="decode plainly, then speculatively: print both speeds, the draft "
                           "acceptance and (greedy) whether the outputs agree")
    p.add_argument("--topk", type=positive_int, default=1,
                   help="greedy speculative only: accept a draft within the main model's top k "
                        "(BPD's relaxation; k > 1 no longer reproduces greedy exactly)")
    p.add_argument("--draft-tokens", type=positive_int, metavar="N",
                   help="speculative only: drafts per round. Default: D + 2 for a DeepSeek tail "
                        "of depth D (its last module reapplied twice to its own output: faster "
                        "at every batch size measured), D for the other objectives. Outputs are "
                        "unchanged; `mtp eval --draft-tokens` measures each N's acceptance")
    p.add_argument("--draft-vocab", type=positive_int, metavar="K",
                   help="speculative only: draft over the K most frequent tokens of "
                        "--draft-data instead of the whole vocabulary (a cheaper draft head; "
                        "outputs are unchanged, acceptance can drop)")
    p.add_argument("--draft-data", metavar="DATASET",
                   help="the prepared dataset (`mtp prepare`, this model's vocabulary) whose "
                        f"training split ranks tokens for --draft-vocab (its first "
                        f"{DRAFT_COUNT_TOKENS // 10**6}M tokens are counted)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--no-graphs", action="store_true",
                   help="run every decoding step eagerly (by default GPUs replay each greedy "
                        "step or speculative round as one captured device graph)")
    p.add_argument("--json", metavar="FILE", help="write outputs and statistics as JSON")
    p.set_defaults(func=run)


def _check_flags(args: argparse.Namespace) -> None:
    if args.top_p > 1:
        raise UsageError(f"--top-p {args.top_p} is not in (0, 1]; use e.g. --top-p 0.95")
    if args.topk > 1 and not (args.speculative or args.compare):
        raise UsageError(f"--topk {args.topk} relaxes the acceptance of speculative drafts; add "
                         "--speculative or drop --topk")
    if args.draft_tokens and not (args.speculative or args.compare):
        raise UsageError(f"--draft-tokens {args.draft_tokens} sets the drafts of speculative "
                         "rounds; add --speculative (or --compare) or drop --draft-tokens")
    if args.draft_vocab and not (args.speculative or args.compare):
        raise UsageError(f"--draft-vocab {args.draft_vocab} restricts speculative drafts; add "
                         "--speculative (or --compare) or drop --draft-vocab")
    if bool(args.draft_vocab) != bool(args.draft_data):
        given, missing = (("--draft-vocab", "--draft-data DATASET") if args.draft_vocab
                          else ("--draft-data", "--draft-vocab K"))
        raise UsageError(f"{given} needs {missing}: the tokens drafted over are the K most "
                         "frequent in the dataset's training split")
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


def _draft_vocab(args: argparse.Namespace, vocab_size: int):
    """The ids of the --draft-vocab most frequent tokens of --draft-data, or None."""
    if not args.draft_vocab:
        return None
    from data_pipeline import load_manifest
    from pretrain.inference import draft_vocab_ids

    try:
        manifest = load_manifest(args.draft_data)
    except ValueError as err:
        raise UsageError(f"--draft-data {args.draft_data}: {err}") from None
    return draft_vocab_ids(manifest, vocab_size, [args.draft_vocab], "--draft-data")[0]


def _summary(name: str, results) -> tuple[str, dict]:
    """One line and a JSON record (speed, the statistics of speculative decoding, each request)
    for all requests of one decoding mode."""
    from model.generation import SpeculativeStats

    tokens = sum(r.num_tokens for r in results)
    seconds = sum(r.seconds for r in results)
    record = {"num_tokens": tokens, "seconds": seconds,
              "tokens_per_second": tokens / seconds if seconds else 0.0,
              "requests": [r.to_dict() for r in results]}
    line = f"{name}: {tokens} tokens in {seconds:.2f} s ({record['tokens_per_second']:.1f} tokens/s)"
    if results[0].stats is not None:
        st = SpeculativeStats.total([r.stats for r in results])
        record.update(st.to_dict())
        line += (f"; {st.depth} drafts a round, {st.mean_tokens_per_forward():.2f} tokens per "
                 "main-model forward; draft acceptance by depth "
                 + " ".join(f"{a:.2f}" for a in st.acceptance_rate()))
    return line, record


def run(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.tokenizer import TextTokenizer
    from model.generation import DecodingEngine, SamplingConfig
    from model.generation.drafters import recommended_drafts
    from model.mtp.objective import objective_class
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
    speculative = args.speculative or args.compare
    if speculative and depth == 0:
        flag = "--compare" if args.compare else "--speculative"
        raise UsageError(f"{args.model} has no MTP tail to draft with (exported without "
                         f"--with-mtp, or trained with mtp.kind none); drop {flag}, or "
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
    draft_vocab = _draft_vocab(args, loaded.model.config.model.vocab_size)
    drafts = args.draft_tokens
    if speculative and drafts is None:
        drafts = recommended_drafts(objective_class(loaded.model.config.mtp.kind).drafter, depth)
    # graphs None: captured device graphs where supported
    try:
        engine = DecodingEngine(loaded.model, graphs=False if args.no_graphs else None,
                                draft_vocab=draft_vocab, draft_tokens=drafts)
    except ValueError as err:  # a --draft-tokens this tail cannot draft
        raise UsageError(f"--draft-tokens {args.draft_tokens}: {err}") from None
    notes: list[str] = []
    max_new = fit_new_tokens(notes, max(len(t) for t in ids), args.max_new_tokens,
                             loaded.model.config.model.max_seq_len,
                             engine.draft_tokens if speculative else None)
    for text in notes:
        note("generate", text)
    sampling = SamplingConfig(args.temperature, args.top_p, args.seed)
    modes = [("plain", False), ("speculative", True)] if args.compare else \
        [("speculative" if args.speculative else "plain", args.speculative)]
    batch = args.batch_size or len(ids)
    results = {name: [engine.generate(ids[i: i + batch], max_new, sampling, loaded.eos_id,
                                      loaded.pad_id, speculative=spec, topk=args.topk)
                      for i in range(0, len(ids), batch)]
               for name, spec in modes}
    name = modes[-1][0]
    tokens = [t for r in results[name] for t in r.tokens]
    # A model's vocabulary may be padded beyond its tokenizer's pieces (model.vocab_size >= the
    # tokenizer's size); an id past them, which a barely trained model can still produce, is
    # shown as the tokenizer's unknown piece.
    texts = [sp.decode(sp.known(seq)) for seq in tokens]
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{prompt}{text}")
    out = {"model": loaded.source, "prompts": prompts, "outputs": texts, "tokens": tokens}
    for mode_name, res in results.items():
        line, out[mode_name] = _summary(mode_name, res)
        print(line, file=sys.stderr)
    if args.compare:
        plain = [t for r in results["plain"] for t in r.tokens]
        same = sum(a == b for a, b in zip(plain, tokens))
        out["identical_sequences"] = same
        caveat = "" if sampling.greedy else " (sampled: outputs differ in general, distributions agree)"
        print(f"speculative vs plain: {same}/{len(tokens)} sequences identical{caveat}",
              file=sys.stderr)
    if args.json:
        write_json(args.json, out)
    return 0
