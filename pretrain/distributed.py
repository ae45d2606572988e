"""Process-group setup: the distributed backend, and one topology shared by megatron-core (TP
groups for the layers) and DeepSpeed (pipeline/data groups), checked to agree. Which launcher
started the process, and its rank: pretrain/launch.py.

Rank layout (both libraries): TP fastest, then DP, then PP — global rank = tp + TP·(dp + DP·pp).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import deepspeed
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from model import accelerator
from pretrain.config import Layout
from pretrain.launch import LaunchEnv


def init_distributed(launch: LaunchEnv, timeout_s: int) -> None:
    """Initialise torch.distributed (gloo on CPU, the accelerator's backend on GPUs)."""
    if not accelerator.is_cpu():
        accelerator.set_device(launch.local_rank)
    backend = accelerator.communication_backend()
    if accelerator.is_cpu():
        # DeepSpeed would JIT-compile a shared-memory all-reduce for CPU worlds on first use
        # (~90 s, cached per user); gloo is all the CPU path needs.
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().create_op_builder("ShareMemCommBuilder").NAME
        deepspeed.ops.__compatible_ops__[name] = False
    timeout = datetime.timedelta(seconds=timeout_s)
    # The timeout given here only covers the world group. The groups that DeepSpeed creates later
    # (dist.new_group without a timeout) take torch's module default (30 min), so a hung peer
    # would stall the survivors in a gradient all-reduce for half an hour: make ours the default.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


@dataclass
class Topology:
    layout: Layout
    ds_topology: PipeModelDataParallelTopology
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    tp_rank: int
    dp_rank: int
    pp_rank: int

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    def metrics_source_rank(self) -> int:
        """The global rank that holds the loss metrics: last stage, first TP and DP rank."""
        return self.ds_topology.get_rank(pipe=self.layout.pp - 1, data=0, model=0)


def _ranks_of(group: dist.ProcessGroup) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def build_topology(layout: Layout, timeout_s: float | None = None) -> Topology:
    """Create megatron-core's groups and DeepSpeed's topology and assert they agree. `timeout_s`:
    the collective timeout of megatron's groups (its own default is 30 minutes)."""
    parallel_state.destroy_model_parallel()
    extra = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp, **extra)
    topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    rank = dist.get_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    for axis, group in (("model", tp_group), ("data", dp_group), ("pipe", pp_group)):
        ds_ranks = next(r for r in topo.get_axis_comm_lists(axis) if rank in r)
        assert sorted(ds_ranks) == _ranks_of(group), (
            f"DeepSpeed's {axis} group {ds_ranks} differs from megatron-core's {_ranks_of(group)}")
    coord = topo.get_coord(rank)
    assert (coord.model, coord.data, coord.pipe) == (
        parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank())
    return Topology(layout, topo, tp_group, dp_group, pp_group, coord.model, coord.data, coord.pipe)


class MegatronMPU:
    """The model-parallel-unit interface DeepSpeed's ordinary engine expects, mapped onto
    megatron-core's TP and DP groups (ZeRO then partitions over DP and reduces norms over TP)."""

    def __init__(self, topo: Topology):
        self.topo = topo

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.layout.tp

    def get_model_parallel_group(self):
        return self.topo.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.layout.dp

    def get_data_parallel_group(self):
        return self.topo.dp_group
