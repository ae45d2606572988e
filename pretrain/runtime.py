"""Every "auto" of a run resolved once, from the config and the device, before anything is built.

The trainer prints the result at start-up and writes it to RUN_DIR/runtime.json, so what a run
really did (precision, compiled or not, which loss kernels, …) is on record beside its config;
nothing below the trainer decides any of it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model import accelerator
from pretrain.config import ConfigError, Layout, ParallelConfig, RunConfig


@dataclass(frozen=True)
class RuntimePolicy:
    device: str
    """The device name ('cpu', 'NVIDIA H200', …)."""
    backend: str
    """The collective backend: 'gloo' on CPU, the accelerator's (NCCL) on GPUs."""
    precision: str
    """'bf16' or 'fp32' (train.precision)."""
    grad_accum_dtype: str
    """'bf16' or 'fp32': gradients accumulated across micro-batches (train.grad_accum_dtype)."""
    compile: bool
    """torch.compile the hot path (train.compile)."""
    loss_kernels: str
    """The fused loss's softmax build: 'triton', 'inductor' or 'eager' (model.loss_kernels)."""
    fused_adam: bool
    """torch's fused AdamW (GPUs only)."""
    pin_memory: bool
    """Batches in page-locked host memory, copied to the device asynchronously (GPUs only)."""
    overlap_comm: bool
    """DeepSpeed's gradient reduction overlapped with the backward pass (parallel.overlap_comm)."""
    device_graphs: bool
    """Decoding during training (acceptance evaluation) replays captured device graphs."""
    async_save: bool = False
    """Interval checkpoints are written in the background (checkpoint.async_save)."""
    document_attention: str = "off"
    """data.mask_cross_document = attention: 'flex' (FlexAttention block masks) or 'dense'
    (an SDPA mask); 'off' otherwise."""

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        switches = ("compile", "fused_adam", "pin_memory", "overlap_comm", "device_graphs",
                    "async_save")
        on = [name for name in switches if getattr(self, name)]
        off = [name for name in switches if not getattr(self, name)]
        docs = ("" if self.document_attention == "off"
                else f", attention within documents ({self.document_attention})")
        return (f"{self.precision} on {self.device} ({self.backend}), gradients accumulated in "
                f"{self.grad_accum_dtype}, loss kernels {self.loss_kernels}{docs}; on: "
                f"{', '.join(on) or '-'}; off: {', '.join(off) or '-'}")


def overlaps_reduction(p: ParallelConfig, dp: int, on_gpu: bool) -> bool:
    """Whether DeepSpeed reduces gradients in buckets during the backward (parallel.overlap_comm).
    'auto': on GPUs from DP 2. With one replica there is nothing to reduce, and the
    per-parameter bucketing only costs host time (110m on one GPU: off is 1.5-2 % faster and
    peaks 0.8 GiB higher)."""
    return p.overlap_comm is True or (p.overlap_comm == "auto" and on_gpu and dp > 1)


def resolve_runtime(cfg: RunConfig, layout: Layout) -> RuntimePolicy:
    on_gpu = not accelerator.is_cpu()
    t, p = cfg.train, cfg.parallel

    if t.precision == "bf16" and not on_gpu:
        raise ConfigError("train.precision = 'bf16' needs a GPU; use 'fp32' or 'auto' on CPU")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    if t.memory_snapshot_steps and not accelerator.memory_history_supported():
        raise ConfigError(f"train.memory_snapshot_steps = {t.memory_snapshot_steps} records the "
                          "GPU allocator's history, and this run has no GPU; set it to 0 (the "
                          "memory plan, `mtp plan`, estimates the same parts without a GPU)")

    # Compiling costs ~30 s per block shape on a CPU and gains little there; ZeRO-3 gathers
    # parameters in module hooks that compiled code would bypass (config validation refuses
    # compile=true with it).
    compiled = t.compile is True or (t.compile == "auto" and on_gpu and p.zero_stage <= 2)

    kernels = cfg.model.loss_kernels
    if kernels == "auto":
        kernels = ("triton" if accelerator.triton_supported() else "inductor") if compiled \
            else "eager"

    overlap = overlaps_reduction(p, layout.dp, on_gpu)

    # bf16 accumulation until an A/B says otherwise: fp32 gradients cost 2 bytes a parameter,
    # which at the 8B shape is what decides whether a layout fits an 80 GB card.
    accum = "fp32" if not bf16 or t.grad_accum_dtype == "fp32" else "bf16"
    return RuntimePolicy(
        device=accelerator.device_name(), backend=accelerator.communication_backend(),
        precision="bf16" if bf16 else "fp32", grad_accum_dtype=accum, compile=compiled,
        loss_kernels=kernels, fused_adam=on_gpu, pin_memory=on_gpu, overlap_comm=overlap,
        # Captured TP collectives work in the decoding engine but have not been measured inside
        # a training run (TP groups shared with training's collectives): TP = 1 only, for now.
        device_graphs=accelerator.graphs_supported() and layout.tp == 1,
        async_save=cfg.checkpoint.async_save is True or (cfg.checkpoint.async_save == "auto"
                                                          and on_gpu),
        document_attention=("off" if cfg.data.mask_cross_document != "attention" else
                            "flex" if accelerator.flex_attention_supported() else "dense"))
