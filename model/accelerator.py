"""The one place where CPU and GPU differ: device, compute dtype and memory statistics.

Everything goes through DeepSpeed's accelerator abstraction (never `torch.cuda` directly), so the
same code runs on CPU (DS_ACCELERATOR=cpu, fp32) and on GPUs (bf16).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from deepspeed.accelerator import get_accelerator


def is_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def current_device() -> torch.device:
    """The device of this process (its local GPU, or the CPU)."""
    return torch.device(get_accelerator().current_device_name())


def default_dtype() -> torch.dtype:
    """Compute dtype: bf16 on accelerators that support it, fp32 on CPU."""
    if is_cpu():
        return torch.float32
    return torch.bfloat16 if get_accelerator().is_bf16_supported() else torch.float16


def reset_peak_memory() -> None:
    if not is_cpu():
        get_accelerator().reset_peak_memory_stats()


def peak_memory_bytes() -> int | None:
    """Peak device memory allocated by torch since the last reset; None on CPU (no allocator
    statistics there: measure process RSS instead)."""
    if is_cpu():
        return None
    return int(get_accelerator().max_memory_allocated())


def memory_history_supported() -> bool:
    """Whether the device allocator can record its allocation history here (not on the CPU)."""
    return not is_cpu()


def record_memory_history(enabled: bool, max_entries: int = 200_000) -> None:
    """Start (or stop) recording every allocation and free of the device allocator, with the
    Python and C++ stacks that made them (the history `dump_memory_history` writes)."""
    assert memory_history_supported(), "no device allocator history on the CPU"
    memory = torch.get_device_module(current_device().type).memory
    memory._record_memory_history("all" if enabled else None, max_entries=max_entries)


def dump_memory_history(path: str) -> None:
    """Write the recorded history and the allocator's current segments to `path` (a pickle that
    https://pytorch.org/memory_viz opens)."""
    torch.get_device_module(current_device().type).memory._dump_snapshot(path)


def device_memory_bytes() -> int | None:
    """Total memory of the current device; None on the CPU (no device memory to plan for)."""
    if is_cpu():
        return None
    return int(get_accelerator().total_memory(current_device().index))


def device_count() -> int:
    """Devices visible to this process (0 on the CPU)."""
    return 0 if is_cpu() else int(get_accelerator().device_count())


def synchronize() -> None:
    if not is_cpu():
        get_accelerator().synchronize()


def set_device(local_rank: int) -> None:
    get_accelerator().set_device(local_rank)


def communication_backend() -> str:
    """The torch.distributed backend: gloo on the CPU, the accelerator's own (NCCL) otherwise."""
    return "gloo" if is_cpu() else get_accelerator().communication_backend_name()


def device_name() -> str:
    """Human-readable name of the current device (GPU model, or 'cpu')."""
    if is_cpu():
        return "cpu"
    dev = current_device()
    return str(torch.get_device_module(dev.type).get_device_name(dev))  # 'NVIDIA H100 80GB HBM3'


def rng_state() -> dict:
    return {} if is_cpu() else {"accelerator": get_accelerator().get_rng_state()}


def set_rng_state(state: dict) -> None:
    if "accelerator" in state and not is_cpu():
        get_accelerator().set_rng_state(state["accelerator"])


def triton_supported() -> bool:
    """Whether hand-written Triton kernels can run here (a GPU and the triton package)."""
    return not is_cpu() and importlib.util.find_spec("triton") is not None


def flex_attention_supported() -> bool:
    """Whether document masks run as FlexAttention block masks here (GPUs; torch's
    FlexAttention has no backward on the CPU, where a dense SDPA mask is used instead)."""
    return not is_cpu()


def graphs_supported() -> bool:
    """Whether `graph_replayer` captures device graphs here (not on the CPU)."""
    return not is_cpu()


def graph_replayer(step: Callable[[], None], pool=None,
                   generators: tuple[torch.Generator, ...] = ()) -> Callable[[], None]:
    """Run `step` once for real, then capture it as a device graph and return a callable that
    replays it: the same kernels on the same buffers with no host work, one launch in all.

    `step` must have static shapes, no host synchronisation, and keep its state in tensors that
    it updates in place (a replay reads and writes the addresses seen at capture). The real
    first run happens on a side stream, as capture requires (it creates library handles and
    workspaces, and compiles what is compiled). `pool`: another replayer's `pool`, to share its
    memory for intermediates (safe when the graphs never run at the same time and keep no
    intermediate alive between runs). `generators`: device generators that `step` draws from;
    each replay draws fresh numbers from their current seed and offset, so reseeding one
    between replays restarts its stream. On the CPU there is nothing to capture: `step` runs
    and is returned as is.
    """
    if not graphs_supported():
        step()
        return step
    acc = get_accelerator()
    side = acc.Stream()
    side.wait_stream(acc.current_stream())
    with acc.stream(side):
        step()
    acc.current_stream().wait_stream(side)
    graph = acc.create_graph()
    for gen in generators:
        graph.register_generator_state(gen)
    with acc.capture_to_graph(graph, pool=pool):
        step()

    def replay() -> None:
        acc.replay_graph(graph)

    replay.graph = graph  # keeps the graph (and its memory pool) alive with the callable
    replay.pool = graph.pool()
    return replay


class LaggedReader:
    """Reads a small device tensor on the host `lag` steps late, without making the device wait:
    each `push` queues a copy of the tensor's current value into page-locked memory, and `pop`
    waits only for the oldest copy. With lag 1 the device already runs the next step while the
    host reads the previous one. On the CPU copies are immediate and the lag is 0."""

    def __init__(self, like: torch.Tensor, lag: int = 1):
        self.lag = 0 if is_cpu() else lag
        n = self.lag + 1
        self._host = [torch.empty(like.shape, dtype=like.dtype, pin_memory=not is_cpu())
                      for _ in range(n)]
        self._events = [get_accelerator().Event() for _ in range(n)] if not is_cpu() else []
        self._pending: list[int] = []
        self._next = 0

    def push(self, tensor: torch.Tensor) -> None:
        i = self._next
        self._next = (i + 1) % len(self._host)
        assert len(self._pending) < len(self._host), "pop before pushing more than lag + 1"
        self._host[i].copy_(tensor, non_blocking=not is_cpu())
        if self._events:
            self._events[i].record()
        self._pending.append(i)

    def ready(self) -> bool:
        """Whether a value `lag` steps old is queued."""
        return len(self._pending) > self.lag

    def pop(self) -> torch.Tensor:
        i = self._pending.pop(0)
        if self._events:
            self._events[i].synchronize()
        return self._host[i]

    def clear(self) -> None:
        self._pending.clear()


class DeviceClock:
    """Elapsed device time between marks, without synchronising when marking: events on GPUs
    (read once the work is done), the host clock on the CPU (where work is synchronous)."""

    def __init__(self):
        self._gpu = not is_cpu()

    def mark(self):
        if not self._gpu:
            import time

            return time.perf_counter()
        event = get_accelerator().Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Seconds from `start` to `end` (waits for `end`)."""
        if not self._gpu:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def report_host_syncs(enabled: bool) -> None:
    """Warn (UserWarning) at every operation that makes the host wait for the device, e.g.
    `.item()` or a copy of a host list to the device (a diagnostic for step loops; no-op on
    CPU)."""
    if not is_cpu():
        torch.get_device_module(current_device().type).set_sync_debug_mode(
            "warn" if enabled else "default")


def empty_cache() -> None:
    """Hand cached, unused device memory back (between measurements of different sizes)."""
    get_accelerator().empty_cache()
