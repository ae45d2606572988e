"""Data pipeline throughput on the stdlib corpus: build, tokenization (MB/s), loader (tokens/s).

Prints a Markdown table (paste it into benchmarks/RESULTS.md, section "Data pipeline (CPU)").
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import BuildConfig, ShardLoader, build_dataset, load_manifest
from data_pipeline.sources import list_stdlib
from data_pipeline.tokenize_parallel import encode_documents


def bench_tokenize(model_bytes: bytes, workers: int) -> tuple[float, float, int]:
    """(MB/s of UTF-8 text, seconds, tokens) for encoding the whole stdlib corpus."""
    refs = list_stdlib()
    t0 = time.perf_counter()
    n_bytes = n_tok = 0
    for doc in encode_documents(refs, model_bytes, "text", "uint16", workers):
        if doc.tokens is not None:
            n_bytes += doc.n_bytes
            n_tok += len(doc.tokens)
    dt = time.perf_counter() - t0
    return n_bytes / dt / 1e6, dt, n_tok


def bench_loader(data: Path, workers: int, batch_size: int, batches: int, depth: int) -> float:
    """Tokens (input_ids) per second delivered to the caller, after a warm-up batch."""
    ld = ShardLoader(data, "train", dp_rank=0, dp_size=1, num_workers=workers,
                     batch_size=batch_size, seed=0, depth=depth, mask_cross_document=True)
    it = iter(ld)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 0
    for b in itertools.islice(it, batches):
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, help="dataset directory (default: a temporary directory)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=300, help="timed batches per loader setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="DataLoader worker counts to time")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "stdlib"
        t0 = time.perf_counter()
        m = build_dataset(BuildConfig(source="stdlib", out_dir=out, vocab_size=args.vocab_size,
                                      seq_len=args.seq_len, max_depth=args.max_depth,
                                      overwrite=True, progress=False))
        build_s = time.perf_counter() - t0
        m = load_manifest(out)
        train = m.data["splits"]["train"]
        print(f"build ({m.status}): {build_s:.1f} s, {train['text_bytes'] / 1e6:.1f} MB text, "
              f"{train['tokens']} train tokens, {train['windows']} windows, "
              f"tokenizer trained on {m.data['tokenizer'].get('sample_bytes', 0) / 1e6:.1f} MB")
        model = m.tokenizer_path.read_bytes()
        rows = ["| measurement | setting | result |", "|---|---|---|",
                f"| full build (`stdlib`, vocab {args.vocab_size}) | {cores} processes | "
                f"{build_s:.1f} s |"]
        for w in sorted({1, cores}):
            mbs, dt, ntok = bench_tokenize(model, w)
            rows.append(f"| tokenization (read + decode + encode) | {w} process(es) | "
                        f"{mbs:.2f} MB/s ({ntok / dt / 1e6:.2f} M tokens/s) |")
        for w in args.workers:
            tps = bench_loader(out, w, args.batch_size, args.batches, args.max_depth)
            per = tps / max(w, 1)
            rows.append(f"| loader, B={args.batch_size} T={args.seq_len} D={args.max_depth}, "
                        f"cross-doc mask | num_workers={w} | {tps / 1e6:.2f} M tokens/s total, "
                        f"{per / 1e6:.2f} M tokens/s per worker |")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
