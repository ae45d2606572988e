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


def model_grad_norms(rank, world):
    """World 1: the project's own engine and model (bf16, ZeRO-1) over one global batch of 16
    sequences, as one micro-batch and as four, with each accumulation dtype: the step's gradient
    norm must not depend on how the batch is split."""
    import dataclasses

    import torch

    from pretrain.config import load_config, validate_layout
    from pretrain.distributed import build_topology, init_distributed
    from pretrain.engine import build_engine
    from pretrain.launch import detect_launch_env
    from pretrain.runtime import resolve_runtime
    from pretrain.step_runner import WholeModelRunner

    init_distributed(detect_launch_env(), 60)
    vocab, seq, n = 512, 32, 16
    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=torch.randint(0, vocab, (1, seq), generator=g),
                 labels=torch.randint(0, vocab, (1, 3, seq), generator=g),
                 loss_mask=torch.ones(1, 3, seq)) for _ in range(n)]
    out = {}
    for accum in ("bf16", "fp32"):
        for micro in (n, n // 4):
            cfg = load_config("configs/tiny-cpu.yaml", [
                f"train.micro_batch_size={micro}", f"train.global_batch_size={n}",
                "model.hidden_size=64", "model.num_layers=2", "model.ffn_hidden_size=128",
                f"model.vocab_size={vocab}", "mtp.depth=2", "optim.grad_clip=0",
                "data.mask_cross_document=false"])
            layout = validate_layout(cfg, 1)
            policy = dataclasses.replace(resolve_runtime(cfg, layout), precision="bf16",
                                         grad_accum_dtype=accum)
            engine = build_engine(cfg, layout, build_topology(layout), policy,
                                  torch.device("cpu"), seq).engine
            runner = WholeModelRunner(engine, torch.device("cpu"), layout.grad_accum)
            batches = ({k: torch.cat([b[k] for b in data[i:i + micro]]) for k in data[0]}
                       for i in range(0, n, micro))
            runner.train_step(batches, 0.3, 0)
            out[(accum, micro)] = float(engine.get_global_grad_norm())
    return out


def test_accumulated_gradient_of_the_model_does_not_depend_on_the_split():
    """DeepSpeed hooks the start of each backward on the tensors it finds in the model's output;
    our output type must expose the loss to it, or the BF16 optimizer (fp32 accumulation) adds
    every earlier micro-batch's gradient again (the norm was 2.8x too large at four)."""
    (norms,) = run_world(model_grad_norms, 1, timeout_s=180)
    for accum in ("bf16", "fp32"):
        whole, split = norms[(accum, 16)], norms[(accum, 4)]
        assert whole > 0 and abs(split / whole - 1) < 1e-2, norms
