"""Explicit tensor-parallel context handed to every layer (no module globals deep in layers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig


@dataclass(frozen=True)
class ParallelContext:
    """The tensor-parallel group this rank belongs to, whether activations between the TP matmuls
    are split along the sequence (model/tp_regions.py), and the dtype parameters are created in."""

    tp_group: dist.ProcessGroup
    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    sequence_parallel_regather: bool = False
    """Sequence-parallel column layers gather their input again in the backward, compiled too
    (model/tp_regions.py, `column_parallel`)."""

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The group the sequence is split over: the TP group with sequence parallelism at
        TP > 1, else None (the layers then see whole sequences)."""
        return self.tp_group if self.sequence_parallel and self.tp_size > 1 else None

    @property
    def tp_size(self) -> int:
        return self.tp_group.size()

    @property
    def tp_rank(self) -> int:
        return self.tp_group.rank()

    def megatron_config(self) -> ModelParallelConfig:
        """megatron-core layer config. Weights are always initialised on the CPU from the full
        ("master") matrix and then sliced, so a TP=N model holds exactly the slices of the TP=1 model
        built from the same seed, and megatron's CUDA RNG tracker is never touched."""
        return ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=self.params_dtype,
            gradient_accumulation_fusion=False,
            sequence_parallel=False,
        )


def single_process_context(params_dtype: torch.dtype = torch.float32) -> ParallelContext:
    """Context for TP=1 in a process that may not be distributed yet (tests, generation, tools).

    megatron-core's layers need a process group even at TP=1, so a world of one is initialised
    (gloo, in-memory store) when torch.distributed is not initialised; an existing world is kept
    and each rank then forms its own TP group of one.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() == 1:
        return ParallelContext(dist.group.WORLD, params_dtype)
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return ParallelContext(groups[dist.get_rank()], params_dtype)


class _NoGroup:
    """Stands in for a TP group of one where no collective will ever run (see meta_context)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def meta_context() -> ParallelContext:
    """Context for building a TP = 1 model on the meta device, to read parameter names and shapes
    (export layouts, the cost model). It needs no process group, so any process may use it at any
    time, also one rank of a running world without the others."""
    return ParallelContext(_NoGroup())  # type: ignore[arg-type]
