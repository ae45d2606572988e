"""The DeepSpeed JSON config, generated from the run config (never written by hand)."""

from __future__ import annotations

from pretrain.config import Layout, RunConfig
from pretrain.runtime import RuntimePolicy

BUCKET_ELEMENTS = 50_000_000
"""DeepSpeed's gradient-reduction and all-gather bucket size, in elements."""


def deepspeed_config(cfg: RunConfig, layout: Layout, policy: RuntimePolicy) -> dict:
    # Buckets of 50M elements, not DeepSpeed's 500M: 100 MB reductions already run at the
    # links' bandwidth. The contiguous bucket only where the reduction overlaps the backward
    # (it stages the gradients the overlapped reduction sends): DeepSpeed's default keeps one
    # from the first backward to the step even with one replica (0.93 GiB of bf16 at the 8B
    # shape, measured live at its peak); without it a reduction flattens each bucket in turn.
    zero: dict = {"stage": cfg.parallel.zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS,
                  "allgather_bucket_size": BUCKET_ELEMENTS,
                  "overlap_comm": policy.overlap_comm,
                  "contiguous_gradients": policy.overlap_comm}
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        # Explicit: DeepSpeed's own default clips at 1.0 when the key is absent.
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # With bf16 the ZeRO optimizers check gradients for inf/NaN and skip such a step.
        "bf16": {"enabled": policy.bf16, "check_grad_overflow": True},
        "data_types": {"grad_accum_dtype": policy.grad_accum_dtype if policy.bf16 else "fp32"},
        # DeepSpeed reduces gradients in the model dtype by default: with fp32 accumulation that
        # would round the accumulated sum to bf16 at the boundary (measured with ZeRO-1's BF16
        # optimizer: 2e-3 relative error on the step, none before it), so reduce in fp32 too.
        **({"communication_data_type": "fp32"} if policy.grad_accum_dtype == "fp32" else {}),
        "fp16": {"enabled": False},
        # The optimizer is our torch AdamW (no JIT-built kernels); ZeRO wraps it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every micro-batch's forward
        # and step, so the host could never queue work ahead of the GPU (measured: 4 full
        # syncs per optimizer step at accumulation 2). The trainer measures throughput itself.
        "timers": {"throughput": {"enabled": False}},
        "dump_state": False,
        # The pipeline engine sends each TP rank 1/TP of an activation and all-gathers it on
        # the next stage, which assumes activations replicated over TP. Under sequence
        # parallelism every TP rank holds its own sequence shard (already 1/TP of the whole).
        "pipeline": {"pipe_partitioned": not cfg.parallel.sequence_parallel,
                     "grad_partitioned": not cfg.parallel.sequence_parallel},
    }
