"""`mtp generate`: text generation, plain or self-speculative with the MTP modules/heads."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain import exit_codes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text (plain or self-speculative decoding)",
        description="Generate continuations of prompts with the decoding engine (KV caches and, "
                    "on GPUs, device graphs captured once and replayed for every request). "
                    "--speculative drafts D tokens with the model's MTP tail and verifies them in "
                    "one forward of the main model: greedy output is identical to plain greedy "
                    "decoding, sampled output follows the main model's distribution exactly. "
                    "--compare runs both and prints each one's speed and the draft acceptance.",
        epilog="examples:\n  mtp generate runs/tiny-cpu/export --prompt 'def main(' --speculative\n"
               "  mtp generate runs/tiny-cpu/export --prompt 'import os' --compare\n"
               "  mtp generate runs/tiny-cpu --prompt-file prompts.txt --batch-size 8 "
               "--temperature 0.8 --top-p 0.95 --speculative --json stats.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="an export directory (with --with-mtp for speculative decoding) or a "
                        "training run/checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line (\\n in a line is a newline)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts decoded together per request (default: all at once); requests "
                        "run one after another on the same engine")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (every request)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--speculative", action="store_true",
                      help="self-speculative decoding with the MTP tail")
    mode.add_argument("--compare", action="store_true",
                      help="decode plainly, then speculatively: print both speeds, the draft "
                           "acceptance and (greedy) whether the outputs agree")
    p.add_argument("--topk", type=int, default=1,
                   help="greedy speculative only: accept a draft within the main model's top k "
                        "(BPD's relaxation; k > 1 no longer reproduces greedy exactly)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--no-graphs", action="store_true",
                   help="run every decoding step eagerly (by default GPUs capture each phase as "
                        "a device graph once and replay it)")
    p.add_argument("--json", metavar="FILE", help="write outputs and statistics as JSON")
    p.set_defaults(func=run)


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
        st = SpeculativeStats(results[0].stats.depth)
        for r in results:
            st.main_forwards += r.stats.main_forwards
            st.tokens += r.stats.tokens
            st.proposed = [a + b for a, b in zip(st.proposed, r.stats.proposed)]
            st.accepted = [a + b for a, b in zip(st.accepted, r.stats.accepted)]
        record.update(st.to_dict())
        line += (f"; {st.mean_tokens_per_forward():.2f} tokens per main-model forward; draft "
                 "acceptance by depth " + " ".join(f"{a:.2f}" for a in st.acceptance_rate()))
    return line, record


def run(args: argparse.Namespace) -> int:
    import sentencepiece as spm
    import torch

    from model.generation import DecodingEngine, SamplingConfig
    from pretrain.export.loading import load_for_inference

    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file) as fh:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in fh if line.strip()]
        except OSError as err:
            print(f"mtp generate: error: --prompt-file: {err}", file=sys.stderr)
            return exit_codes.USAGE
    if not prompts:
        print("mtp generate: error: give --prompt TEXT or --prompt-file FILE", file=sys.stderr)
        return exit_codes.USAGE
    if args.batch_size is not None and args.batch_size < 1:
        print(f"mtp generate: error: --batch-size {args.batch_size} must be >= 1",
              file=sys.stderr)
        return exit_codes.USAGE
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    modes = [("plain", False), ("speculative", True)] if args.compare else \
        [("speculative" if args.speculative else "plain", args.speculative)]
    batch = args.batch_size or len(prompts)
    try:
        loaded = load_for_inference(args.model, dtype)
        if loaded.tokenizer_path is None:
            raise ValueError(f"{args.model} comes with no tokenizer.model; export it with its "
                             "dataset's tokenizer")
        sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))
        ids = [sp.encode(p) for p in prompts]
        sampling = SamplingConfig(args.temperature, args.top_p, args.seed)
        engine = DecodingEngine(loaded.model, graphs=False if args.no_graphs else None)
        results = {}
        for name, speculative in modes:
            results[name] = [
                engine.generate(ids[i : i + batch], args.max_new_tokens, sampling, loaded.eos_id,
                                loaded.pad_id, speculative=speculative, topk=args.topk)
                for i in range(0, len(ids), batch)]
    except (ValueError, OSError) as err:
        print(f"mtp generate: error: {err}", file=sys.stderr)
        return exit_codes.USAGE
    name = modes[-1][0]
    tokens = [t for r in results[name] for t in r.tokens]
    texts = [sp.decode(t) for t in tokens]
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
        note = "" if sampling.greedy else " (sampled: outputs differ in general, distributions agree)"
        print(f"speculative vs plain: {same}/{len(tokens)} sequences identical{note}",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0
