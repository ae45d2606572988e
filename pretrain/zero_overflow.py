"""A one-kernel inf/NaN check for the gradients of DeepSpeed's ZeRO-1/2 optimizer.

With bf16, ZeRO-1/2 tests every gradient partition for inf/NaN before each optimizer step (the
step is then skipped: `bf16.check_grad_overflow`). DeepSpeed does it tensor by tensor (amax,
amin, two isfinite, and, not, add per gradient), several hundred small kernel launches per step
for a ~110M model, which the profile of our host-bound small-model steps showed (benchmarks/RESULTS.md). The same
question is answered by one multi-tensor max-abs (`torch._foreach_norm` with ord=inf, the kernel
behind `clip_grad_norm_`): it is inf when some element is ±inf and NaN when some element is NaN.
DeepSpeed's reduction over ranks and its single host sync stay as they are.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _has_overflow_fused(opt: DeepSpeedZeroOptimizer) -> torch.Tensor:
    """Drop-in for `has_overflow_partitioned_grads_serial`: a [1] bool tensor on the device."""
    grads = [g for i in range(len(opt.bit16_groups)) for g in opt.averaged_gradients[i]
             if g is not None and g.numel()]
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=opt.device)
    max_abs = torch.stack(torch._foreach_norm(grads, ord=float("inf")))  # [n_grads]
    return max_abs.isfinite().logical_not().any().reshape(1)


def use_fused_overflow_check(optimizer) -> bool:
    """Install the fused check on a ZeRO-1/2 optimizer; False (nothing changed) otherwise, e.g.
    for ZeRO-3 or CPU offload, whose checks take other paths."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    assert hasattr(optimizer, "has_overflow_partitioned_grads_serial"), \
        "DeepSpeed renamed ZeRO-1/2's overflow check; update pretrain/zero_overflow.py"
    optimizer.has_overflow_partitioned_grads_serial = lambda: _has_overflow_fused(optimizer)
    return True
