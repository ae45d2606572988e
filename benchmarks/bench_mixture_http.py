"""Loader throughput on a three-source weighted mixture read over loopback HTTP.

Builds three datasets from slices of the interpreter's stdlib (one tokenizer, trained on the
first and reused by the others), serves them with `python -m http.server` on 127.0.0.1 (its own
process), and times the training loader (B=16, T=1024, D=4, cross-document masks) on the mixture
read over HTTP, against the same mixture read from the local files. A data-parallel row times
rank 0 of DP=4, which streams every shard and keeps a quarter of the samples (the price of the
layout-free position, docs/DESIGN.md): its tokens/s are the tokens it hands to its GPU.

Prints a Markdown table with each row's ratio to the GPU's consumption (default 554,453 tokens/s:
the 110m shape on one H200, benchmarks/RESULTS.md); paste it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import BuildConfig, DataSource, RemoteOptions, ShardLoader, build_dataset
from data_pipeline.sources import stdlib_root
from pretrain.launch import free_port

# Three disjoint slices of the stdlib by top-level name (s* left out: it holds site-packages).
SLICES = {"a-e": ("[a-e]*.py", "[a-e]*/**/*.py"), "f-o": ("[f-o]*.py", "[f-o]*/**/*.py"),
          "p-z": ("[p-r]*.py", "[p-r]*/**/*.py", "[t-z]*.py", "[t-z]*/**/*.py")}


def build(out: Path, args) -> list[Path]:
    if args.source is None:
        slices = {name: (stdlib_root(), include) for name, include in SLICES.items()}
    else:  # the first three subdirectories of the given corpus
        subdirs = sorted(d for d in args.source.iterdir() if d.is_dir())[:3]
        if len(subdirs) < 3:
            raise SystemExit(f"--source {args.source} needs three subdirectories")
        slices = {d.name: (d, ("**/*.py",)) for d in subdirs}
    dirs, tokenizer = [], None
    for name, (root, include) in slices.items():
        t0 = time.perf_counter()
        m = build_dataset(BuildConfig(
            source=str(root), include=include, out_dir=out / name,
            vocab_size=None if tokenizer else args.vocab_size, seq_len=args.seq_len,
            max_depth=args.max_depth, shard_samples=args.shard_samples, tokenizer_path=tokenizer,
            tokenizer_sample_bytes=args.tokenizer_sample_bytes, val_fraction=0.0,
            num_workers=args.build_workers, overwrite=True, progress=False))
        tokenizer = tokenizer or m.tokenizer_path
        train = m.data["splits"]["train"]
        print(f"source {name}: {m.status} in {time.perf_counter() - t0:.1f} s, "
              f"{train['windows']} windows in {len(train['shards'])} shards", flush=True)
        dirs.append(out / name)
    return dirs


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the loopback HTTP server did not start")


def tokens_per_s(sources, args, workers: int, dp: int = 1) -> tuple[float, int]:
    """(input tokens/s handed to the caller after a warm-up batch, retries) for DP rank 0."""
    ld = ShardLoader(sources, "train", dp_rank=0, dp_size=dp, num_workers=workers,
                     batch_size=args.batch_size, seed=0, depth=args.max_depth,
                     mask_cross_document=True, remote=RemoteOptions(retries=3))
    it = iter(ld)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b["input_ids"].numel() for b in itertools.islice(it, args.batches))
    return n / (time.perf_counter() - t0), len(ld.retries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where the datasets go (default: a temporary dir)")
    p.add_argument("--source", type=Path,
                   help="a corpus whose first three subdirectories are the sources (default: "
                        "three slices of the stdlib)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-depth", type=int, default=4)
    p.add_argument("--shard-samples", type=int, default=4096)
    p.add_argument("--tokenizer-sample-bytes", type=int, default=20_000_000)
    p.add_argument("--build-workers", type=int, help="tokenizer processes (default: all cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=2000,
                   help="timed batches per row (enough to pass the first shuffle block of "
                        "each source: the reader buffers a block before its first batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--weights", type=float, nargs=3, default=[0.5, 0.3, 0.2])
    p.add_argument("--dp", type=int, default=4, help="data-parallel size of the rank-share row")
    p.add_argument("--gpu-tokens-per-s", type=float, default=554_453.0,
                   help="what one GPU consumes (default: 110m on one H200, RESULTS.md)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        dirs = build(out, args)
        server, url = serve(out)
        try:
            local = [DataSource(str(d), w, d.name) for d, w in zip(dirs, args.weights)]
            remote = [DataSource(url + d.name + "/", w, d.name) for d, w in zip(dirs, args.weights)]
            rows = ["| reader | setting | tokens/s | × GPU consumption |", "|---|---|---|---|"]
            gpu = args.gpu_tokens_per_s
            cases = [("local files", local, w, 1) for w in args.workers]
            cases += [("loopback HTTP", remote, w, 1) for w in args.workers]
            cases += [(f"loopback HTTP, rank 0 of DP={args.dp}", remote, w, args.dp)
                      for w in args.workers if w > 0]
            for what, sources, workers, dp in cases:
                tps, retries = tokens_per_s(sources, args, workers, dp)
                extra = f"; {retries} retries" if retries else ""
                rows.append(f"| {what} | num_workers={workers}{extra} | {tps:,.0f} | "
                            f"{tps / gpu:.1f}× |")
                print(rows[-1], flush=True)
        finally:
            server.kill()
            server.wait()
    print(f"\nthree-source mixture {args.weights}, B={args.batch_size} T={args.seq_len} "
          f"D={args.max_depth}, cross-document masks, {os.cpu_count()} cores")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
