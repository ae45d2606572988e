"""Opt-in torch.compile of the training hot path, and of the decoding hot path.

Compiled: every transformer block's cache-free forward (the trunk's and the MTP modules'), the
DeepSeek modules' input mix (two RMSNorms and the concat) and every other RMSNorm (the final
norm, the MTP output norms). The fused head + cross-entropy's per-chunk softmax work has builds of
its own (`use_loss_kernels`; pretrain/runtime.py picks Triton or Inductor for compiled runs).
Left eager: the embedding lookup, the matmuls of the loss (already
single cuBLAS calls), the MTP projection (a row-parallel linear with its TP collective) and
everything that runs with a KV cache. The module tree, parameter names and values are unchanged,
so checkpoints, exports and DeepSpeed's hooks see the same model.
"""

from __future__ import annotations

from torch import nn

from model.block import TransformerBlock
from model.embedding import SharedEmbedding
from model.loss_kernels import KERNEL_KINDS


def use_loss_kernels(model: nn.Module, kind: str) -> None:
    """Run the fused loss's softmax work of every shared embedding in `model` with the build
    `kind` (model/loss_kernels.py); which one suits the device is the caller's choice."""
    assert kind in KERNEL_KINDS, kind
    for module in model.modules():
        if isinstance(module, SharedEmbedding):
            module.loss_kernels = kind


def compile_for_training(model: nn.Module) -> int:
    """Compile the hot path inside `model` (any module tree: the whole model or a pipeline
    stage). Returns the number of transformer blocks compiled."""
    blocks = 0
    covered: set[int] = set()  # modules already inside a compiled region
    for module in model.modules():  # pre-order: a region's owner comes before its parts
        if id(module) in covered:
            continue
        if hasattr(module, "compile_training_forward"):
            covered.update(id(m) for m in module.compile_training_forward())
            blocks += isinstance(module, TransformerBlock)
    return blocks


def compile_for_decoding(model: nn.Module) -> int:
    """Compile what decoding runs, region by region: every transformer block's cached forward
    (trunk, MTP modules, parallel heads: one region shape serves them all), the DeepSeek input
    mix and the norms outside blocks, in eval mode. The decoding engine replays these regions
    inside captured device graphs, where a small model's step is otherwise launch-bound (each
    RMSNorm alone is ~8 kernels). Returns the number of transformer blocks compiled. The module
    tree is unchanged; the training regions, if any, are kept."""
    blocks = 0
    covered: set[int] = set()
    for module in model.modules():
        if id(module) in covered:
            continue
        if hasattr(module, "compile_decoding_forward"):
            covered.update(id(m) for m in module.compile_decoding_forward())
            blocks += isinstance(module, TransformerBlock)
    return blocks
