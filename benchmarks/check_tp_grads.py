"""Gradient check under tensor parallelism, on the real backend (NCCL on GPUs, gloo on the CPU):
a small DeepSeek-MTP model at TP = the world size, with and without sequence parallelism, eager
and compiled (Inductor, and AOT-eager: the same traced graphs without Inductor's code), each
parameter's gradient against the single-process fp32 model with the same weights. The "-views"
variants let the collectives return views of their buffers again (see model/tp_regions.py), to
check whether a torch build still compiles those wrong.

    torchrun --standalone --nproc-per-node 2 benchmarks/check_tp_grads.py \
        [--hidden 1024 --layers 4 --seq 1024 --batch 2 --dtype bf16] [--json F]

Each row: the loss against the reference's, the relative error ‖g − g_ref‖ / ‖g_ref‖ of the
whole gradient and the worst parameter's, the ratio of the gradient norms, and the graph breaks
that compilation met. bf16 rounding gives ~1e-2, a wrong gradient ~1. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DecoderConfig, ModelConfig, MTPConfig, MTPLanguageModel, accelerator  # noqa: E402
from model.compile import compile_for_training, use_loss_kernels  # noqa: E402
from model.parallel import ParallelContext, single_process_context  # noqa: E402
from model.sharding import full_grads, load_full_state_dict  # noqa: E402

# blocks/loss kernels: how the blocks run (eager, or compiled with that backend; "-views": with
# the collectives returning views of their buffers, as before model/tp_regions.py's `_fresh`) and
# the fused loss's kernels
VARIANTS = ("eager/eager", "eager/triton", "aot_eager/eager", "inductor/eager", "inductor/triton",
            "aot_eager-views/eager", "inductor-views/triton")


@contextlib.contextmanager
def view_results():
    """tp_regions' collectives returning views of their buffers where a contiguous result is
    one (at B = 1 along the sequence, and along rows): with torch 2.11 on two H200s, compiled
    (AOT-eager or Inductor), that gave the sequence-parallel weights gradients with ~99 %
    relative error."""
    from model import tp_regions

    saved = tp_regions._fresh
    tp_regions._fresh = lambda x: x.contiguous()
    try:
        yield
    finally:
        tp_regions._fresh = saved


@contextlib.contextmanager
def compile_backend(backend: str):
    """torch.compile with `backend` for what compile_for_training compiles."""
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def model_config(args, recompute: str) -> DecoderConfig:
    return DecoderConfig(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                     num_layers=args.layers, num_heads=args.heads,
                                     num_kv_heads=args.kv_heads, ffn_hidden_size=args.ffn,
                                     max_seq_len=args.seq,
                                     recompute=recompute), MTPConfig("deepseek", 1))


def grads_of(model, batch, group=None):
    """Loss and full (unsharded) fp32 gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(*batch, mtp_weight=0.3)
    out.loss.backward()
    g = full_grads(model, group) if group is not None else {
        n: p.grad for n, p in model.named_parameters()}
    return out.loss.item(), {n: v.float() for n, v in g.items() if v is not None}


def compare(ref, got):
    (ref_loss, rg), (loss, g) = ref, got
    missing = sorted(set(rg) - set(g))
    num = sum(((g[n] - rg[n]) ** 2).sum() for n in g).sqrt()
    den = sum((rg[n] ** 2).sum() for n in rg).sqrt()
    norm = sum((g[n] ** 2).sum() for n in g).sqrt()
    per = {n: ((g[n] - rg[n]).norm() / rg[n].norm().clamp_min(1e-30)).item() for n in g}
    worst = sorted(per.items(), key=lambda kv: -kv[1])[:4]
    return dict(loss=loss, ref_loss=ref_loss, rel=(num / den).item(),
                norm_ratio=(norm / den).item(), worst=worst, missing=missing[:8])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="default: the model's own rule")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--recompute", default="none,selective,full",
                   help="comma-separated recompute modes to check")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sp", default="true,false", help="sequence parallelism: true,false")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator.set_device(local_rank)
    dist.init_process_group(accelerator.communication_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    device = accelerator.current_device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, args.vocab, (args.batch, 2, args.seq), generator=g).to(device)
    batch = (ids, labels, None)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{accelerator.device_name()}, world {world}, {args.dtype}, torch {torch.__version__}")
    single = single_process_context()  # each rank's own group of one, for the reference
    rows = []
    for recompute in args.recompute.split(","):
        cfg = model_config(args, recompute)
        torch.manual_seed(0)
        ref_model = MTPLanguageModel(cfg, single).to(device)
        full = {n: t.detach().cpu() for n, t in ref_model.named_parameters()}
        ref = grads_of(ref_model, batch)  # fp32, eager, one process (each rank the same)
        del ref_model
        for sp in (s == "true" for s in args.sp.split(",")):
            for variant in args.variants.split(","):
                blocks, loss_kernels = variant.split("/")
                if loss_kernels == "triton" and not accelerator.triton_supported():
                    continue
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                start = time.perf_counter()
                ctx = ParallelContext(dist.group.WORLD, sequence_parallel=sp)
                model = MTPLanguageModel(cfg, ctx)
                load_full_state_dict(model, full, ctx.tp_group)
                model.to(device=device, dtype=dtype)
                if blocks != "eager":
                    with compile_backend(blocks.removesuffix("-views")):
                        compile_for_training(model)
                use_loss_kernels(model, loss_kernels)
                with (view_results() if blocks.endswith("-views")
                      else contextlib.nullcontext()):
                    got = grads_of(model, batch, ctx.tp_group)
                breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
                row = dict(recompute=recompute, sp=sp, variant=variant, graph_breaks=breaks,
                           **compare(ref, got))
                rows.append(row)
                say(f"recompute {recompute:<9} sp {sp!s:<5} {variant:<22} loss {row['loss']:.5f} "
                    f"(ref {row['ref_loss']:.5f})  rel {row['rel']:.2e}  norm ratio "
                    f"{row['norm_ratio']:.4f}  breaks {breaks}  {time.perf_counter() - start:.0f} s  worst "
                    + ", ".join(f"{n} {e:.1e}" for n, e in row["worst"][:2])
                    + (f"  MISSING {row['missing']}" if row["missing"] else ""), flush=True)
                del model
                accelerator.empty_cache()
    if args.json and rank == 0:
        args.json.write_text(json.dumps(dict(device=accelerator.device_name(), world=world,
                                             args={k: str(v) for k, v in vars(args).items()},
                                             rows=rows), indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
