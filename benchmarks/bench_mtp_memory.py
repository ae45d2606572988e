"""Peak memory of one MTP training step (forward + backward) versus depth D, fused vs unfused loss.

The unfused loss materialises every depth's full-vocabulary logits (and their gradients) at once;
the fused, chunked head + cross-entropy keeps one chunk of logits whatever D is. Each point runs in
a fresh process: on a GPU the allocator's peak is read; on the CPU the kernel's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs just before the step) minus the
resident set at that moment.

    python benchmarks/bench_mtp_memory.py                 # table on this machine
    python benchmarks/bench_mtp_memory.py --json out.json # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_peak() -> int:
    """Reset the peak-RSS mark (Linux ≥ 4.0) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def measure(kind: str, depth: int, impl: str, args: argparse.Namespace) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.cpu else os.environ.get("DS_ACCELERATOR", ""))
    if not os.environ["DS_ACCELERATOR"]:
        del os.environ["DS_ACCELERATOR"]
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from megatron.core import parallel_state

    from model import (
        DecoderConfig,
        ModelConfig,
        MTPConfig,
        MTPLanguageModel,
        single_process_context,
    )
    from model import accelerator as acc

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = acc.default_dtype()
    ctx = single_process_context(params_dtype=dtype)
    if not parallel_state.is_initialized():
        parallel_state.initialize_model_parallel(1)
    dev = acc.current_device()
    cfg = DecoderConfig(
        ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, max_seq_len=args.seq, loss_chunk_tokens=args.chunk,
                    loss_impl=impl),
        MTPConfig(kind=kind, depth=depth))
    model = MTPLanguageModel(cfg, ctx).to(dev)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    labels = torch.randint(0, args.vocab, (args.batch, depth + 1, args.seq), device=dev)

    def step():
        out = model(ids, labels, None, mtp_weight=0.3)
        out.loss.backward()
        return out

    step()  # warm-up: allocator caches, lazy inits, gradient buffers
    model.zero_grad(set_to_none=False)
    acc.synchronize()
    acc.reset_peak_memory()
    rss_before = _reset_rss_peak()
    t0 = time.perf_counter()
    step()
    acc.synchronize()
    seconds = time.perf_counter() - t0
    peak = acc.peak_memory_bytes()
    if peak is None:
        peak = _status_kib("VmHWM") * 1024 - rss_before
        metric = "peak RSS growth during the step"
    else:
        metric = "peak allocated during the step"
    logits_per_depth = args.batch * args.seq * args.vocab * 4
    return dict(kind=kind, depth=depth, impl=impl, peak_bytes=int(peak), metric=metric,
                step_seconds=seconds, logits_bytes_per_depth=logits_per_depth,
                device=str(dev), dtype=str(dtype))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="0,1,2,3,4", help="D values to measure (0 = next-token only)")
    p.add_argument("--kind", default="deepseek",
                   help="a registered MTP objective (model/mtp/), e.g. deepseek, parallel, blockwise")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunk", type=int, default=1024, help="model.loss_chunk_tokens for 'fused'")
    p.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--_point", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._point:
        kind, depth, impl = args._point.split(":")
        print(json.dumps(measure(kind, int(depth), impl, args)))
        return 0

    rows = []
    for impl in ("unfused", "fused"):
        for depth in (int(d) for d in args.depths.split(",")):
            kind = "none" if depth == 0 else args.kind
            cmd = [sys.executable, __file__, *sys.argv[1:], "--_point", f"{kind}:{depth}:{impl}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return res.returncode
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  measured {impl:8s} D={depth}: {r['peak_bytes'] / 2**20:8.1f} MiB "
                  f"({r['step_seconds']:.2f} s)", file=sys.stderr, flush=True)

    mib = 2**20
    print(f"\nShape: vocab {args.vocab}, d {args.hidden}, {args.layers} layers, batch {args.batch} × "
          f"seq {args.seq}; fused chunk {args.chunk} tokens; device {rows[0]['device']} "
          f"{rows[0]['dtype']}; metric: {rows[0]['metric']}. One depth's fp32 logits = "
          f"{rows[0]['logits_bytes_per_depth'] / mib:.0f} MiB.\n")
    print("| D | unfused peak (MiB) | fused peak (MiB) | fused / unfused | unfused step (s) | fused step (s) |")
    print("|---|---|---|---|---|---|")
    by = {(r["impl"], r["depth"]): r for r in rows}
    for depth in sorted({r["depth"] for r in rows}):
        u, f = by[("unfused", depth)], by[("fused", depth)]
        print(f"| {depth} | {u['peak_bytes'] / mib:.0f} | {f['peak_bytes'] / mib:.0f} | "
              f"{f['peak_bytes'] / u['peak_bytes']:.2f} | {u['step_seconds']:.2f} | {f['step_seconds']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=platform.node(), args=vars(args), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
