"""Time the fused head + cross-entropy (forward and backward) with each build of its per-chunk
softmax work (model/loss_kernels.py: eager, inductor, triton), and check that they agree.

One row per build: milliseconds per call (median of --iters after --warmup), the achieved
bandwidth of the softmax work alone (the time minus the three matmuls', timed separately, over
the bytes that work must move), peak memory, and the largest difference from the eager build's
losses and gradients. Defaults are the 110m benchmark shape's D=1 micro-batch: 2 × 32 × 1024
rows, d 768, vocab 32000, chunks of 8192 rows, bf16.

    python benchmarks/bench_loss_kernels.py                       # on this GPU
    python benchmarks/bench_loss_kernels.py --json out.json
    python benchmarks/bench_loss_kernels.py --cpu --rows 512 --vocab 1000 --dim 64 --chunk 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536, help="rows scored per call (tokens × depths)")
    p.add_argument("--dim", type=int, default=768, help="hidden size d")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    p.add_argument("--chunk", type=int, default=8192, help="rows per chunk (model.loss_chunk_tokens)")
    p.add_argument("--builds", default="eager,inductor,triton",
                   help="comma-separated builds to time (default: all three)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per build (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 (a smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("rows", "dim", "vocab", "chunk", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0 (got {args.warmup})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from model import accelerator as acc
    from model.loss import fused_head_cross_entropy
    from model.loss_kernels import KERNEL_KINDS, chunk_kernels, triton_available
    from model.parallel import single_process_context

    builds = [b for b in args.builds.split(",") if b]
    for b in builds:
        if b not in KERNEL_KINDS:
            raise SystemExit(f"--builds: unknown build {b!r}; choose from {KERNEL_KINDS}")
    if "triton" in builds and not (triton_available() and (args.cpu or acc.triton_supported())):
        print("triton is not usable here: skipping that build", file=sys.stderr)
        builds.remove("triton")

    device, dtype = acc.current_device(), acc.default_dtype()
    group = single_process_context(dtype).tp_group
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.rows, args.dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=g) * 0.02).to(device, dtype)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    row_weights = torch.full((args.rows,), 1.0 / args.rows, device=device)

    def call(build: str):
        hidden.grad = weight.grad = None
        out = fused_head_cross_entropy(hidden, weight, targets, row_weights, group, 0,
                                       args.chunk, kernels=build)
        out.total.backward()
        return out

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.iters):
            acc.synchronize()
            t0 = time.perf_counter()
            fn()
            acc.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    # The three matmuls per chunk alone (logits, grad_h, grad_w): what no build can avoid.
    def matmuls():
        for s in range(0, args.rows, args.chunk):
            h = hidden.detach()[s:s + args.chunk]
            logits = h @ weight.detach().t()
            _ = logits @ weight.detach()
            _ = logits.t() @ h
    matmul_ms = timed(matmuls)
    # Bytes the softmax work must move per call: read the logits for the stats, read them again
    # and write the gradient.
    elem = torch.finfo(dtype).bits // 8
    softmax_bytes = 3 * args.rows * args.vocab * elem

    # The TP path (stats, all-reduce, gradient) on the second half of the vocabulary, as a TP=2
    # rank holds it: the largest difference from the eager build over the stats and gradient.
    n_split = min(args.chunk, args.rows)
    v_half = args.vocab // 2
    split_logits = (hidden.detach()[:n_split] @ weight.detach()[v_half:].t()).contiguous()
    split_t = targets[:n_split]

    def split_path(build: str) -> list:
        kern = chunk_kernels(build)
        stats = kern.stats(split_logits.clone(), split_t, v_half)
        log_norm = stats[0] + stats[1].log()
        grad = kern.grad(split_logits.clone(), log_norm, split_t, v_half, row_weights[:n_split])
        return [t.float() for t in (*stats, grad)]
    split_ref = split_path("eager")

    ref = None
    rows = []
    for build in builds:
        acc.reset_peak_memory()
        ms = timed(lambda b=build: call(b))
        out = call(build)
        peak = acc.peak_memory_bytes()
        res = (out.row_loss.detach().float(), hidden.grad.float(), weight.grad.float())
        if ref is None:
            ref = res
        diff = [float((a - b).abs().max()) for a, b in zip(res, ref)]
        softmax_ms = ms - matmul_ms
        rows.append(dict(
            build=build, ms=round(ms, 3), softmax_ms=round(softmax_ms, 3),
            softmax_gb_s=round(softmax_bytes / (softmax_ms * 1e-3) / 1e9, 1) if softmax_ms > 0 else None,
            peak_gib=round(peak / 2**30, 2) if peak is not None else None,
            max_diff_loss=diff[0], max_diff_grad_h=diff[1], max_diff_grad_w=diff[2],
            max_diff_tp_path=max(float((a - b).abs().max())
                                 for a, b in zip(split_path(build), split_ref))))
        print(f"{build}: {ms:.2f} ms", file=sys.stderr, flush=True)

    print(f"# fused head + cross-entropy, forward + backward: {args.rows} rows, d {args.dim}, "
          f"V {args.vocab}, chunks of {args.chunk}, {dtype} on {acc.device_name()}")
    print(f"matmuls alone: {matmul_ms:.2f} ms\n")
    print("| build | ms / call | softmax work ms | its GB/s | peak GiB | max Δ loss vs first | "
          "Δ grad_h | Δ grad_w | Δ TP path vs eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['ms']:.2f} | {r['softmax_ms']:.2f} | {r['softmax_gb_s']} | "
              f"{r['peak_gib']} | {r['max_diff_loss']:.2e} | {r['max_diff_grad_h']:.2e} | "
              f"{r['max_diff_grad_w']:.2e} | {r['max_diff_tp_path']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            shape=dict(rows=args.rows, dim=args.dim, vocab=args.vocab, chunk=args.chunk,
                       dtype=str(dtype)),
            device=acc.device_name(), matmul_ms=round(matmul_ms, 3), builds=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
