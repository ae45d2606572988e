"""Gradient check on a GPU: one transformer block, and a small MTP model, in bf16 against an
fp32 reference, eager and compiled, for each recomputation mode.

    python benchmarks/check_block_grads.py [--hidden 4096 --heads 32 --kv-heads 8 --ffn 14336
        --seq 4096 --batch 2] [--json F]

The CPU tests compare every path in fp32, where attention runs one kernel family; on a GPU the
attention kernels (flash / memory-efficient, chosen per call from the layouts of q, k and v)
and the compiled regions differ from those, so their gradients are checked here against the same
block in fp32 with the math attention kernel. Each row is the relative error
‖g − g_ref‖ / ‖g_ref‖ of the input's gradient and the worst parameter's; bf16 rounding gives
~1e-2, a wrong kernel ~1. The row "contiguous q/k/v" runs attention on copies laid out
contiguously (the layout-dependent kernel choice ruled out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DecoderConfig, ModelConfig, MTPConfig, MTPLanguageModel  # noqa: E402
from model import attention as attention_module  # noqa: E402
from model.accelerator import current_device, empty_cache  # noqa: E402
from model.block import TransformerBlock  # noqa: E402
from model.compile import compile_for_training, use_loss_kernels  # noqa: E402
from model.parallel import single_process_context  # noqa: E402


@contextlib.contextmanager
def contiguous_attention():
    original = attention_module._attend

    def attend(q, k, v, mask, gqa):
        return original(q.contiguous(), k.contiguous(), v.contiguous(), mask, gqa)

    attention_module._attend = attend
    try:
        yield
    finally:
        attention_module._attend = original


@contextlib.contextmanager
def math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def grads(module, loss_fn, x=None, ctx=contextlib.nullcontext):
    """The loss and the gradients of `module`'s parameters (and of its input `x`, if given)."""
    module.zero_grad(set_to_none=True)
    x = None if x is None else x.detach().requires_grad_()
    with ctx():  # the backward too: recomputed regions must run the same kernels again
        loss = loss_fn(module) if x is None else loss_fn(module, x)
        loss.backward()
    out = {} if x is None else {"input": x.grad}
    out.update({n: p.grad.detach().clone() for n, p in module.named_parameters()
                if p.grad is not None})
    return loss.item(), out


def compare(name, result, ref):
    loss, g = result
    errs = {n: rel(g[n], ref[1][n]) for n in ref[1]}
    worst = max((v, n) for n, v in errs.items() if n != "input")
    row = dict(variant=name, loss=loss, ref_loss=ref[0], input=errs.get("input"),
               worst_param=worst[1], worst=worst[0])
    print(f"  {name:<34} loss {loss:.5f} (ref {ref[0]:.5f})  input {row['input'] or 0:.2e}  "
          f"worst {worst[0]:.2e} ({worst[1]})", flush=True)
    return row


def block_rows(args, device, ctx):
    rows = []
    x = torch.randn(args.batch, args.seq, args.hidden, device=device)
    r = torch.randn_like(x)

    def loss_fn(block, inp):
        return (block(inp.to(next(block.parameters()).dtype)).float() * r).mean()

    for mode in ("none", "selective", "full"):
        cfg = ModelConfig(vocab_size=128, hidden_size=args.hidden, num_layers=32,
                          num_heads=args.heads, num_kv_heads=args.kv_heads,
                          ffn_hidden_size=args.ffn, max_seq_len=args.seq, recompute=mode)
        ref_block = TransformerBlock(cfg, ctx).to(device)
        with torch.no_grad():
            for p in ref_block.parameters():
                p.add_(0.05 * torch.randn_like(p))
        state = ref_block.state_dict()
        print(f"block, recompute {mode}:", flush=True)
        ref = grads(ref_block, loss_fn, x, math_attention)
        for name, compiled, cm in (("eager bf16", False, contextlib.nullcontext),
                                   ("eager bf16, contiguous q/k/v", False, contiguous_attention),
                                   ("compiled bf16", True, contextlib.nullcontext)):
            block = TransformerBlock(cfg, ctx).to(device)
            block.load_state_dict(state)
            block.to(torch.bfloat16)
            if compiled:
                block.compile_training_forward()
            row = compare(name, grads(block, loss_fn, x, cm), ref)
            rows.append(dict(part="block", recompute=mode, **row))
            del block
        del ref_block
        empty_cache()
    return rows


def model_rows(args, device, ctx):
    rows = []
    seq = args.seq
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (args.batch, seq), generator=g).to(device)
    labels = torch.randint(0, 32000, (args.batch, 2, seq), generator=g).to(device)

    def loss_fn(model):
        return model(ids, labels, None, mtp_weight=0.3).loss

    for mode in ("none", "selective", "full"):
        dcfg = DecoderConfig(ModelConfig(vocab_size=32000, hidden_size=1024, num_layers=4,
                                         num_heads=16, num_kv_heads=4, max_seq_len=seq,
                                         recompute=mode), MTPConfig("deepseek", 1))
        ref_model = MTPLanguageModel(dcfg, ctx).to(device)
        state = ref_model.state_dict()
        print(f"model (1024 wide, 4 layers, DeepSeek D=1), recompute {mode}:", flush=True)
        ref = grads(ref_model, loss_fn, ctx=math_attention)
        for name, compiled in (("eager bf16", False), ("compiled bf16", True)):
            model = MTPLanguageModel(dcfg, ctx).to(device)
            model.load_state_dict(state)
            model.to(torch.bfloat16)
            if compiled:
                compile_for_training(model)
                use_loss_kernels(model, "triton" if device.type == "cuda" else "inductor")
            row = compare(name, grads(model, loss_fn), ref)
            rows.append(dict(part="model", recompute=mode, **row))
            del model
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--skip-model", action="store_true", help="only the block")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = current_device()
    ctx = single_process_context()
    rows = block_rows(args, device, ctx)
    if not args.skip_model:
        rows += model_rows(args, device, ctx)
    if args.json:
        args.json.write_text(json.dumps(dict(device=str(device), args=vars(args) | {
            "json": str(args.json)}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
