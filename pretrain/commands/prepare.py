"""`mtp prepare`: build the tokenizer, packed token shards and manifest of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.commands import positive_float, positive_int
from pretrain.errors import UsageError

DESCRIPTION = """\
Build a training dataset: train a sentencepiece BPE tokenizer (or reuse one), tokenize the corpus
in parallel, pack documents (separated by EOS) into windows of SEQ_LEN + MAX_DEPTH + 1 tokens and
write webdataset .tar shards for a train split and a held-out validation split (by document),
plus DATA/manifest.json with every shard's size and sha256.

--tokenizer reuses a published model's tokenizer: its Hugging Face tokenizer.json (special tokens
from the tokenizer_config.json beside it) or its sentencepiece tokenizer.model, with its own
special ids (recorded in the manifest; its EOS separates documents, --eos-token names it where
the files do not). Train such a model further with train.init_from=ITS_DIRECTORY.

Sources:
  stdlib         the Python standard library of this interpreter (no download; CPU demos, tests)
  pinned-code    Python files of ansible 11.12.0, homeassistant 2025.4.4, Django 5.2.8 and
                 sympy 1.14.0 (pip download, sha256-pinned; generated files skipped)
  DIR            every file under DIR matching --include (default **/*.py)
  FILE.jsonl     one document per line, text in --jsonl-field

Running again with the same inputs reports "up to date"; an --out that holds a different
dataset is refused unless --overwrite is given. Output is byte-identical across runs and
independent of --workers.
"""

EXAMPLES = """\
examples:
  mtp prepare --source stdlib --out data/stdlib --vocab-size 8192 --seq-len 512
  mtp prepare --source pinned-code --out data/code --vocab-size 32000 --seq-len 1024 --max-depth 4
  mtp prepare --source ~/src/myrepo --include '**/*.py' --include '**/*.pyi' --out data/repo
  mtp prepare --source corpus.jsonl --jsonl-field content --out data/jsonl --tokenizer data/code/tokenizer.model
  mtp prepare --source ~/src/myrepo --out data/llama --tokenizer ~/models/TinyLlama/tokenizer.json --add-bos
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenizer + packed token shards + manifest from a corpus",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", metavar="stdlib|pinned-code|DIR|FILE.jsonl",
                   help="corpus to build from (default: stdlib)")
    p.add_argument("--out", required=True, type=Path, metavar="DATA",
                   help="dataset directory to create (shards, tokenizer.model, manifest.json)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="glob selecting files of a DIR source, repeatable (default: **/*.py)")
    p.add_argument("--jsonl-field", default="text", metavar="NAME",
                   help="JSON field holding the text of a .jsonl source (default: text)")
    p.add_argument("--vocab-size", type=positive_int, metavar="N",
                   help="BPE vocabulary size (default: 32000), or the expected size of the "
                        "--tokenizer given (default: its own)")
    p.add_argument("--seq-len", type=positive_int, default=1024, metavar="T",
                   help="input tokens per sample (default: 1024)")
    p.add_argument("--max-depth", type=int, default=4, metavar="D",
                   help="largest MTP depth the data must support (default: 4)")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="fraction of documents held out for validation, 0 for none (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and tokenizer sample (default: 0)")
    p.add_argument("--shard-samples", type=positive_int, default=4096, metavar="N",
                   help="windows per shard (default: 4096)")
    p.add_argument("--tokenizer", type=Path, metavar="FILE",
                   help="reuse this tokenizer instead of training one: a Hugging Face "
                        "tokenizer.json, a sentencepiece .model, or a model directory holding one")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="the --tokenizer's end-of-text token, if its files do not name one")
    p.add_argument("--add-bos", action="store_true",
                   help="start every document with the tokenizer's BOS token")
    p.add_argument("--tokenizer-sample-mb", type=positive_float, default=20.0, metavar="MB",
                   help="train the tokenizer on at most this many MB of training documents (default: 20)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="tokenizer processes (default: all cores; the output does not depend on it)")
    p.add_argument("--download-dir", type=Path, metavar="DIR",
                   help="pinned-code download/extract cache (default: DATA/downloads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different dataset already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _summary(m) -> str:
    d = m.data
    lines = [f"dataset {'is up to date' if m.status == 'up-to-date' else 'built'}: {m.path}",
             f"  tokenizer {m.tokenizer_path.name} (vocab {d['vocab_size']}, sha256 "
             f"{d['tokenizer']['sha256'][:12]}), windows of {d['window_len']} tokens "
             f"(seq_len {d['seq_len']} + max_depth {d['max_depth']} + 1), {d['dtype']}",
             f"  special ids {m.special_ids} (documents end with eos {m.eos_id})"]
    for split, s in d["splits"].items():
        lines.append(f"  {split}: {s['documents']} documents, {s['tokens']} tokens, "
                     f"{s['windows']} windows in {len(s['shards'])} shards")
    skipped = {k: v for k, v in d["skipped"].items() if k != "examples" and v}
    if skipped:
        lines.append(f"  skipped documents: {skipped}; examples: {d['skipped']['examples']}")
    return "\n".join(lines)


# BuildConfig's fields as this command's flags, for its error messages.
FLAGS = {"source": "--source", "out_dir": "--out", "include": "--include",
         "jsonl_field": "--jsonl-field", "vocab_size": "--vocab-size", "seq_len": "--seq-len",
         "max_depth": "--max-depth", "val_fraction": "--val-fraction", "seed": "--seed",
         "shard_samples": "--shard-samples", "tokenizer_path": "--tokenizer",
         "tokenizer_sample_bytes": "--tokenizer-sample-mb", "num_workers": "--workers",
         "download_dir": "--download-dir", "overwrite": "--overwrite",
         "progress": "--no-progress"}


def run(args: argparse.Namespace) -> int:
    # Imported here so that `mtp --help` stays fast.
    from data_pipeline import BuildConfig, BuildConfigError, build_dataset

    try:
        config = BuildConfig(
            source=args.source, out_dir=args.out, include=tuple(args.include or ("**/*.py",)),
            jsonl_field=args.jsonl_field,
            vocab_size=args.vocab_size or (None if args.tokenizer else 32000),
            seq_len=args.seq_len, eos_token=args.eos_token, add_bos=args.add_bos,
            max_depth=args.max_depth, val_fraction=args.val_fraction, seed=args.seed,
            shard_samples=args.shard_samples, tokenizer_path=args.tokenizer,
            tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 1e6), num_workers=args.workers,
            download_dir=args.download_dir, overwrite=args.overwrite, progress=not args.no_progress)
        manifest = build_dataset(config)
    except BuildConfigError as err:
        raise UsageError(err.render(lambda field: FLAGS.get(field, field))) from None
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    print(_summary(manifest))
    return 0
