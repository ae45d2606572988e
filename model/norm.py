"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 for bf16 stability."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.tp_regions import sum_grad_over_tp


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype: torch.dtype = torch.float32,
                 sp_group: dist.ProcessGroup | None = None):
        """`sp_group`: with sequence parallelism, the norm sees 1/TP of the tokens and its
        gain's gradient is summed over this (TP) group."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.sp_group = sp_group
        if sp_group is not None:
            self.weight.sequence_parallel_grad = True
        self._compiled_forward = None  # see compile_training_forward; not a submodule
        self._compiled_inference = None  # see compile_decoding_forward

    def compile_training_forward(self) -> list[nn.Module]:
        """Compile the norm for training: one fused kernel each way instead of ~8 elementwise
        passes over fp32 copies. Evaluation and generation (eval mode) stay eager."""
        self._compiled_forward = torch.compile(self._forward)
        return [self]

    def compile_decoding_forward(self) -> list[nn.Module]:
        """Compile the norm for decoding (eval mode): one kernel instead of ~8."""
        self._compiled_inference = torch.compile(self._forward, dynamic=True)
        return [self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self._compiled_forward is not None:
            return self._compiled_forward(x)
        if not self.training and self._compiled_inference is not None:
            return self._compiled_inference(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the gain: the same order as Llama/HF, which keeps
        # exported models numerically identical.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return sum_grad_over_tp(self.weight, self.sp_group) * xf.to(x.dtype)


def make_norm(dim: int, eps: float, ctx) -> RMSNorm:
    """An RMSNorm in the context's parameter dtype, on sequence shards under sequence
    parallelism (`ctx`: model.parallel.ParallelContext)."""
    return RMSNorm(dim, eps, ctx.params_dtype, ctx.sp_group)
