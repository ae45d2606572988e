"""train.grad_accum_dtype = fp32 really accumulates bf16 micro-batch gradients in fp32: through
the DeepSpeed config the project generates, with ZeRO-1 (DeepSpeed's BF16 optimizer) and ZeRO-2.
DeepSpeed runs bf16 on the CPU too, which the trainer itself does not offer. And through the
project's own engine and model: a step's gradient does not depend on how its batch is split into
micro-batches and ranks, nor on the ZeRO stage, accumulation dtype or overlapped reduction."""

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


VOCAB, SEQ, GLOBAL = 512, 32, 16


def _model_step_norm(rank, world, micro, overrides, **policy):
    """One optimizer step of the project's own engine and model (bf16 on the CPU, fp32 masters)
    over the same GLOBAL sequences, each rank taking its share in `micro`-sized micro-batches;
    returns the step's gradient norm."""
    import dataclasses

    import torch

    from pretrain.config import load_config, validate_layout
    from pretrain.distributed import build_topology
    from pretrain.engine import build_engine
    from pretrain.runtime import resolve_runtime
    from pretrain.step_runner import WholeModelRunner

    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=torch.randint(0, VOCAB, (1, SEQ), generator=g),
                 labels=torch.randint(0, VOCAB, (1, 3, SEQ), generator=g),
                 loss_mask=torch.ones(1, 3, SEQ)) for _ in range(GLOBAL)]
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"train.micro_batch_size={micro}", f"train.global_batch_size={GLOBAL}",
        "model.hidden_size=64", "model.num_layers=2", "model.ffn_hidden_size=128",
        f"model.vocab_size={VOCAB}", "mtp.depth=2", "optim.grad_clip=0",
        "data.mask_cross_document=false", *overrides])
    layout = validate_layout(cfg, world)
    engine = build_engine(cfg, layout, build_topology(layout),
                          dataclasses.replace(resolve_runtime(cfg, layout), precision="bf16",
                                              **policy),
                          torch.device("cpu"), SEQ).engine
    mine = data[rank::world]
    batches = ({k: torch.cat([b[k] for b in mine[i:i + micro]]) for k in mine[0]}
               for i in range(0, len(mine), micro))
    WholeModelRunner(engine, torch.device("cpu"), layout.grad_accum).train_step(batches, 0.3, 0)
    return float(engine.get_global_grad_norm())


def model_grad_norms(rank, world):
    """World 1: the whole batch as one micro-batch and as four, with each accumulation dtype."""
    from pretrain.distributed import init_distributed
    from pretrain.launch import detect_launch_env

    init_distributed(detect_launch_env(), 60)
    return {(accum, micro): _model_step_norm(rank, world, micro, [], grad_accum_dtype=accum)
            for accum in ("bf16", "fp32") for micro in (GLOBAL, GLOBAL // 4)}


def data_parallel_grad_norms(rank, world):
    """World 2: two micro-batches a rank, for ZeRO-1/2 × accumulation dtype × overlapped
    reduction (the GPU default with DP > 1, which no other CPU test runs)."""
    from pretrain.distributed import init_distributed
    from pretrain.launch import detect_launch_env

    init_distributed(detect_launch_env(), 60)
    return {(zero, accum, overlap): _model_step_norm(
                rank, world, GLOBAL // 4, [f"parallel.zero_stage={zero}",
                                           f"parallel.overlap_comm={str(overlap).lower()}"],
                grad_accum_dtype=accum, overlap_comm=overlap)
            for zero in (1, 2) for accum in ("bf16", "fp32") for overlap in (False, True)}


def test_accumulated_gradient_of_the_model_does_not_depend_on_the_split():
    """DeepSpeed hooks the start of each backward on the tensors it finds in the model's output;
    our output type must expose the loss to it, or the BF16 optimizer (fp32 accumulation) adds
    every earlier micro-batch's gradient again (the norm was 2.8x too large at four)."""
    (norms,) = run_world(model_grad_norms, 1, timeout_s=180)
    for accum in ("bf16", "fp32"):
        whole, split = norms[(accum, GLOBAL)], norms[(accum, GLOBAL // 4)]
        assert whole > 0 and abs(split / whole - 1) < 1e-2, norms


def test_data_parallel_gradient_does_not_depend_on_zero_dtype_or_overlap():
    """The same global batch over two ranks: every ZeRO stage, accumulation dtype and reduction
    mode gives one gradient (bf16 rounding apart), and it is the one-rank gradient."""
    (one,) = run_world(model_grad_norms, 1, timeout_s=180)
    norms = run_world(data_parallel_grad_norms, 2, timeout_s=240)[0]
    reference = one[("fp32", GLOBAL)]
    for key, norm in norms.items():
        assert abs(norm / reference - 1) < 1e-2, (key, norms, reference)
