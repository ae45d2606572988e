"""Weight initialisation functions (called by megatron-core on the full, unsliced matrix)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float) -> InitMethod:
    def init(t: torch.Tensor) -> None:
        torch.nn.init.normal_(t, mean=0.0, std=std)

    return init


def scaled_output_init(std: float, num_layers: int) -> InitMethod:
    """GPT-2/Megatron scaling for projections that write into the residual stream: keeps the
    residual variance independent of depth."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def zero_init(t: torch.Tensor) -> None:
    torch.nn.init.zeros_(t)
