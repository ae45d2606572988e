"""Opt-in torch.compile of the training hot path.

Compiled: every transformer block's cache-free forward (the trunk's and the MTP modules') and the
fused head + cross-entropy's per-chunk kernels. Left eager: the embedding lookup, the matmuls of
the loss (already single cuBLAS calls), the MTP glue (a concat and one projection) and everything
that runs with a KV cache. The module tree, parameter names and values are unchanged, so
checkpoints, exports and DeepSpeed's hooks see the same model.
"""

from __future__ import annotations

from torch import nn

from model.block import TransformerBlock
from model.embedding import SharedEmbedding


def compile_for_training(model: nn.Module) -> int:
    """Compile the hot path of every block and shared embedding/head inside `model` (any module
    tree: the whole model or a pipeline stage). Returns the number of blocks compiled."""
    blocks = 0
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile_training_forward()
            blocks += 1
        elif isinstance(module, SharedEmbedding) and module.loss_impl == "fused":
            module.compiled_loss = True
    return blocks
