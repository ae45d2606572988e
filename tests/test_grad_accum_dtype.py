"""train.grad_accum_dtype = fp32 really accumulates bf16 micro-batch gradients in fp32: through
the DeepSpeed config the project generates, with ZeRO-1 (DeepSpeed's BF16 optimizer) and ZeRO-2.
DeepSpeed runs bf16 on the CPU too, which the trainer itself does not offer."""

from __future__ import annotations

import pytest

from tests.distributed import run_world

pytestmark = [pytest.mark.distributed]


def accumulation_errors(rank, world):
    """World 1: eight micro-batches accumulated into one SGD step (lr 1, so the fp32 master
    weight changes by minus the mean gradient), against the fp64 mean of the same bf16
    micro-batch gradients computed by a plain copy of the model: what is left is the error of
    the accumulation alone."""
    import copy
    import dataclasses

    import deepspeed
    import torch

    from pretrain.config import load_config, validate_layout
    from pretrain.deepspeed_config import deepspeed_config
    from pretrain.distributed import init_distributed
    from pretrain.launch import detect_launch_env
    from pretrain.runtime import RuntimePolicy

    init_distributed(detect_launch_env(), 60)
    out = {}
    for zero in (1, 2):
        for accum in ("bf16", "fp32"):
            cfg = load_config("configs/tiny-cpu.yaml", [
                f"parallel.zero_stage={zero}", "train.micro_batch_size=1",
                "train.global_batch_size=8", "optim.grad_clip=0"])
            layout = validate_layout(cfg, 1)
            policy = RuntimePolicy(
                device="cpu", backend="gloo", precision="bf16", grad_accum_dtype=accum,
                compile=False, loss_kernels="eager", fused_adam=False, pin_memory=False,
                overlap_comm=False, device_graphs=False)
            torch.manual_seed(0)
            model = torch.nn.Linear(256, 256, bias=False)
            plain = copy.deepcopy(model).bfloat16()
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                config=deepspeed_config(cfg, layout, dataclasses.replace(policy)))
            w0 = engine.module.weight.detach().double().clone()
            g = torch.Generator().manual_seed(1)
            exact = torch.zeros_like(w0)
            for _ in range(layout.grad_accum):
                x = torch.randn(4, 256, generator=g).bfloat16()
                engine.backward(engine(x).float().pow(2).sum())
                engine.step()
                plain.zero_grad()
                # DeepSpeed scales each micro-batch's loss by 1/accumulation (exact in bf16).
                (plain(x).float().pow(2).sum() / layout.grad_accum).backward()
                exact += plain.weight.grad.double()
            delta = w0 - _fp32_master(engine.optimizer).view_as(w0).double()
            out[(zero, accum)] = ((delta - exact).abs().max() / exact.abs().max()).item()
    return out


def _fp32_master(optimizer):
    """The one parameter's fp32 master copy (the bf16 module weight would round the update)."""
    for name in ("fp32_groups_flat_partition", "single_partition_of_fp32_groups"):
        if hasattr(optimizer, name):  # BF16_Optimizer (ZeRO-1 + fp32 accumulation) / ZeRO-1,2
            return getattr(optimizer, name)[0].detach()
    raise AssertionError(f"no fp32 master weights in {type(optimizer).__name__}")


def test_fp32_accumulation_is_more_exact_than_bf16():
    (errors,) = run_world(accumulation_errors, 1, timeout_s=120)
    for zero in (1, 2):
        # Summing in bf16 rounds every partial sum (~2^-9 relative); in fp32 only fp32 rounding.
        assert errors[(zero, "bf16")] > 1e-4, errors  # the bf16 sum does lose precision
        assert errors[(zero, "fp32")] < 1e-5, errors
