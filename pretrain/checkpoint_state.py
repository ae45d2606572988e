"""The model and optimizer state of a checkpoint, in a layout-free form.

Each rank writes what it owns, without communicating: for every parameter, the fp32 master value
and Adam's two moments of its fragment — a contiguous range [start, start + numel) of the
flattened tensor-parallel shard the rank holds (ZeRO splits the shards further over the
data-parallel ranks) — under the parameter's full name (as in MTPLanguageModel), with the
shard's TP rank, TP size and shape. Any layout reads the fragments it needs back: a rank
reassembles the full (TP = 1) tensor of each of its parameters from the fragments of the old TP
shards that overlap its own, cuts its new shard and fragment out of it, and writes them into
DeepSpeed's optimizer. So a checkpoint resumes on another TP, PP or DP size or ZeRO stage with
every fp32 master value and both moments intact; `mtp checkpoint convert` only makes the reads
cheaper (one whole tensor per parameter).

Why not DeepSpeed's universal checkpoint (docs/DESIGN.md, "Checkpoints and resume", has the
measurements): it needs an offline conversion before any load, writes a weights copy beside the
fp32 state, and its loader matches optimizer groups by position, which lost the norm gains' state
when the TP size (and so our group count) changed. The fragments here are named by parameter,
written from what the running optimizer holds, with the split read off each parameter
(model/sharding.py).

Files: `state_rankNNNNN.safetensors` (tensors `NAME|TP|FIELD`) and `state_rankNNNNN.json` (the
index: per name, the TP rank and size, the shard's shape and the fragment's start and numel).
Frozen parameters (no optimizer state) are saved whole from their module by one rank.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from model.sharding import concat_shards, shard_tensor, tp_layout

MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
FIELDS = (MASTER, *MOMENTS)


def _rank_file(rank: int, suffix: str) -> str:
    return f"state_rank{rank:05d}.{suffix}"


@dataclass(frozen=True)
class Owner:
    """Where this rank's piece of one parameter sits: its TP shard and the fragment of it."""

    name: str
    param: nn.Parameter
    tp_rank: int
    tp_size: int
    start: int
    numel: int
    zero3: bool
    frozen: bool = False
    """No optimizer state: the whole shard is saved from the module (by one rank)."""
    writes: bool = True
    """This rank writes the fragment (every rank reads and loads its own)."""


def owned(named: dict[str, nn.Parameter], tp_rank: int, tp_size: int,
          dp_rank: int) -> list[Owner]:
    """This rank's fragments of the parameters in `named` (full name → parameter)."""
    out = []
    for name, p in named.items():
        split = tp_layout(p) is not None
        shard_tp = (tp_rank, tp_size) if split else (0, 1)
        # A parameter replicated over TP is written by its TP rank 0 only.
        first = split or tp_rank == 0
        if not p.requires_grad:
            numel = p.ds_numel if hasattr(p, "ds_id") else p.numel()
            out.append(Owner(name, p, *shard_tp, 0, numel, hasattr(p, "ds_id"), frozen=True,
                             writes=first and dp_rank == 0))
        elif hasattr(p, "ds_id"):  # ZeRO-3: an even (padded) split of the flattened shard
            part = p.ds_tensor.ds_numel
            start = p._z3_optimizer._get_param_partition_rank(p) * part
            out.append(Owner(name, p, *shard_tp, start, max(0, min(part, p.ds_numel - start)),
                             True, writes=first))
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2, BF16 optimizer
            address = p._hp_mapping.lp_fragment_address
            out.append(Owner(name, p, *shard_tp, address.start, address.numel, False,
                             writes=first))
    return out


def _read_local(owner: Owner, field: str) -> torch.Tensor | None:
    p = owner.param
    if owner.frozen:
        if field != MASTER:
            return None
        if owner.zero3:
            from deepspeed.zero import GatheredParameters

            with GatheredParameters([p]):
                return p.detach().float().reshape(-1).clone()
        return p.detach().float().reshape(-1)
    if owner.zero3:
        key = None if field == MASTER else field
        t = p._z3_optimizer.get_local_fp32_param(p, key)
        return None if t is None else t[: owner.numel]
    if field == MASTER:
        return p._hp_mapping.get_hp_fragment()
    optim = p._hp_mapping.optim_fragment
    return None if not optim or field not in optim else optim[field]


def link_optimizer_state(optimizer) -> None:
    """Point every parameter's fragment at its optimizer state. DeepSpeed links them once,
    lazily, after the first step's first group: the moments of later groups would stay
    unlinked (and unsaved)."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        optimizer._hp_optimizer_states_linked = False
        link()


class HostBuffers:
    """The host copies a save writes, kept from one save to the next (a save starts after the
    previous one has finished writing them). With `pinned` (GPUs) they are page-locked, so the
    device-to-host copies run asynchronously at the link's speed and training waits for one
    synchronisation. Allocating them is the expensive part: copied fragment by fragment into
    fresh pageable memory, gpt-1b's 15 GB state paused training 10.6 s on an H200, and into
    fresh pinned memory 7.8 s, against 0.3 s into buffers kept from an earlier save
    (benchmarks/RESULTS.md). `reserve` pays that allocation ahead of the first save, off the
    training thread.

    Reserved buffers are views into slabs of a few large allocations: torch's pinned allocator
    rounds every allocation up to a power of two, which per fragment would page-lock up to twice
    the state."""

    SLAB_BYTES = 1 << 30
    ALIGN = 64  # bytes; every view starts on a cache line, so any dtype may view it

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._buffers: dict[str, torch.Tensor] = {}
        self.reserved_bytes = 0
        self.allocated_by_saves = 0
        """Buffers `copy` had to allocate: none after a complete `reserve` (the tests check)."""

    def reserve(self, layout: list[tuple[str, int, torch.dtype]],
                stop: threading.Event | None = None) -> None:
        """Allocate (and fault in) the buffers of `layout` — (key, numel, dtype) as
        `fragment_layout` lists them — packed into slabs, largest first. Runs on a helper
        thread (torch releases the GIL while it allocates); `stop` ends it between slabs, so a
        run that ends early need not wait for the whole reservation."""
        nbytes = {key: numel * dtype.itemsize for key, numel, dtype in layout}
        slab_bytes = max(self.SLAB_BYTES, _power_of_two_ceil(max(nbytes.values(), default=0)))
        slabs: list[list[tuple[str, int, torch.dtype]]] = []
        free: list[int] = []  # bytes left in each slab
        for key, numel, dtype in sorted(layout, key=lambda x: -nbytes[x[0]]):
            size = -(-nbytes[key] // self.ALIGN) * self.ALIGN
            fit = next((i for i, left in enumerate(free) if left >= size), None)
            if fit is None:
                slabs.append([])
                free.append(slab_bytes)
                fit = len(slabs) - 1
            slabs[fit].append((key, numel, dtype))
            free[fit] -= size
        for i, members in enumerate(slabs):
            if stop is not None and stop.is_set():
                return
            used = slab_bytes - free[i]
            # Pinned slabs are whole (the allocator would round a cut one up anyway) except the
            # last, cut to what it holds; pageable ones are cut to what they hold.
            cut = i == len(slabs) - 1 or not self.pinned
            slab = torch.empty(used if cut else slab_bytes, dtype=torch.uint8,
                               pin_memory=self.pinned)
            if not self.pinned:
                slab.zero_()  # fault the pages in now, not during the first save's copies
            self.reserved_bytes += slab.numel()
            offset = 0
            for key, numel, dtype in members:
                size = numel * dtype.itemsize
                self._buffers[key] = slab[offset: offset + size].view(dtype)
                offset += -(-size // self.ALIGN) * self.ALIGN

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A flat host copy of `t` (complete after `wait`)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != t.numel() or buf.dtype != t.dtype:
            buf = torch.empty(t.numel(), dtype=t.dtype, pin_memory=self.pinned)
            self._buffers[key] = buf
            self.allocated_by_saves += 1
        buf.copy_(t.detach().reshape(-1), non_blocking=self.pinned)
        return buf

    def wait(self) -> None:
        if self.pinned:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()


def host_memory_available() -> int | None:
    """Bytes of host memory the kernel can give without swapping (MemAvailable), where
    /proc/meminfo exists."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory_warning(per_rank: int, local_ranks: int, available: int | None) -> str | None:
    """What to tell the user when the host copies of background saves (kept for the whole run)
    of the ranks on one host need more than 90 % of its available memory; None when they fit
    or the free memory is unknown."""
    need = per_rank * local_ranks
    if available is None or need <= 0.9 * available:
        return None
    gib = 2**30
    return (f"background saves hold {per_rank / gib:.1f} GiB of host memory on each of the "
            f"{local_ranks} rank(s) on this host ({need / gib:.1f} GiB), more than the "
            f"{available / gib:.1f} GiB available. Set checkpoint.async_save=false (each save then "
            "pauses training for its write), or spread the job over more hosts")


def _power_of_two_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _key(owner: Owner, field: str) -> str:
    return f"{owner.name}|{owner.tp_rank}|{field}"


def fragment_layout(owners: list[Owner]) -> list[tuple[str, int, torch.dtype]]:
    """(key, numel, dtype) of every host copy `snapshot` makes, read without copying or
    communicating (so frozen ZeRO-3 parameters, gathered at each save, are left out). Before
    the first step Adam's moments do not exist yet: they are taken to be like the fp32 master
    fragment, as Adam creates them (a save that finds otherwise allocates its own buffer)."""
    out = []
    for o in owners:
        if not o.writes or (o.frozen and o.zero3):
            continue
        if o.frozen:  # read from the module at each save, as fp32
            out.append((_key(o, MASTER), o.numel, torch.float32))
            continue
        master = _read_local(o, MASTER)
        for field in FIELDS:
            try:
                t = master if field == MASTER else _read_local(o, field)
            except KeyError:  # ZeRO-3 before the first step: no state for the parameter yet
                t = None
            t = master if t is None else t
            out.append((_key(o, field), t.numel(), t.dtype))
    return out


def snapshot(owners: list[Owner], buffers: HostBuffers) -> tuple[dict, dict[str, torch.Tensor]]:
    """(index, host copies of every owned fragment): what a save writes. Copying to the host
    is all that has to happen before training may go on; the writing can follow later."""
    index, tensors = {}, {}
    for o in owners:
        if o.frozen and o.zero3:
            _read_local(o, MASTER)  # the gather is collective: every rank takes part
        if not o.writes:
            continue
        fields = []
        for field in FIELDS:
            t = _read_local(o, field)
            if t is None:
                continue
            key = _key(o, field)
            tensors[key] = buffers.copy(key, t)
            fields.append(field)
        shard_shape = list(o.param.ds_shape) if o.zero3 else list(o.param.shape)
        index.setdefault(o.name, []).append({
            "tp_rank": o.tp_rank, "tp_size": o.tp_size, "shard_shape": shard_shape,
            "start": o.start, "numel": o.numel, "fields": fields})
    buffers.wait()
    return index, tensors


def write_rank_files(directory: Path, rank: int, index: dict,
                     tensors: dict[str, torch.Tensor]) -> None:
    """The rank's tensors, then its index (the index last: it is what names the tensors)."""
    write_safetensors(directory / _rank_file(rank, "safetensors"), tensors)
    (directory / _rank_file(rank, "json")).write_text(json.dumps(index))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor from the host buffers. safetensors'
    save_file first turns every tensor into a bytes object, a second copy of the whole state in
    host memory (~50 GB per rank at 8B): this writes the same format (an 8-byte little-endian
    header length, the JSON header padded to 8 bytes, the data in header order) with no copy."""
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: write_safetensors takes contiguous host tensors of "
                             f"{sorted(map(str, _SAFETENSORS_DTYPES))}, got {t.dtype} on "
                             f"{t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    # Widest dtypes first (as safetensors orders them), so every tensor's data stays aligned to
    # its element size after the 8-byte-aligned header.
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset = header[name]["data_offsets"][1]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            if tensors[name].numel():  # a byte view: numpy has no bfloat16
                f.write(memoryview(tensors[name].reshape(-1).view(torch.uint8).numpy()))


class SavedState:
    """Reader of a checkpoint's fragments: whole tensors or single TP shards, by full name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.pieces: dict[str, list[dict]] = {}
        files = sorted(self.directory.glob("state_rank*.json"))
        if not files:
            raise FileNotFoundError(f"{self.directory} holds no state_rank*.json")
        for f in files:
            rank_file = f.with_suffix(".safetensors").name
            if not (self.directory / rank_file).is_file():
                raise ValueError(f"{self.directory} lacks {rank_file} (its index {f.name} is "
                                 "there); the checkpoint is incomplete")
            for name, entries in json.loads(f.read_text()).items():
                for e in entries:
                    self.pieces.setdefault(name, []).append({**e, "file": rank_file})
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return sorted(self.pieces)

    def has(self, name: str, field: str) -> bool:
        return any(field in e["fields"] for e in self.pieces.get(name, []))

    def _tensor(self, file: str, key: str) -> torch.Tensor:
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            return self._handles[file].get_tensor(key)
        except (OSError, SafetensorError) as err:  # truncated, overwritten, unreadable
            raise ValueError(f"{self.directory / file} is unreadable ({err})") from None

    def tp_shard(self, name: str, field: str, tp_rank: int) -> torch.Tensor:
        """The saved TP shard `tp_rank` of `name`, from its fragments."""
        entries = [e for e in self.pieces[name] if e["tp_rank"] == tp_rank]
        assert entries, (name, tp_rank)
        shape = entries[0]["shard_shape"]
        flat = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32)
        covered = 0
        for e in entries:
            if field in e["fields"] and e["numel"]:
                key = f"{name}|{e['tp_rank']}|{field}"
                flat[e["start"]: e["start"] + e["numel"]] = self._tensor(e["file"], key)
                covered += e["numel"]
        if covered != flat.numel():
            raise ValueError(f"{self.directory}: {name} ({field}) has {covered} of "
                             f"{flat.numel()} values of TP shard {tp_rank}; the checkpoint is "
                             "incomplete")
        return flat.view(shape)

    def full(self, name: str, field: str, layout: tuple[int, int] | None) -> torch.Tensor:
        """The whole (TP = 1) tensor; `layout` is the parameter's (partition dim, stride)."""
        tp_size = self.pieces[name][0]["tp_size"]
        shards = [self.tp_shard(name, field, r) for r in range(tp_size)]
        if tp_size == 1:
            return shards[0]
        assert layout is not None, f"{name} is split over TP in the checkpoint"
        return concat_shards(shards, *layout)

    def local_shard(self, name: str, field: str, layout: tuple[int, int] | None,
                    tp_rank: int, tp_size: int) -> torch.Tensor:
        """This rank's TP shard of `name` under the current TP size."""
        saved_tp = self.pieces[name][0]["tp_size"]
        if layout is None or saved_tp == tp_size:
            return self.tp_shard(name, field, tp_rank if layout is not None else 0)
        return shard_tensor(self.full(name, field, layout), *layout, tp_rank, tp_size)


def _ensure_optimizer_state(optimizer) -> None:
    """Create Adam's state (zeros) where the optimizer has not stepped yet, through the
    optimizer's own code: one step at lr 0 on zero gradients, which changes no weight."""
    inner = getattr(optimizer, "optimizer", optimizer)
    lists = [g["params"] for g in inner.param_groups]
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        # ZeRO-3 fills its inner optimizer's parameter lists only while it steps.
        for g in inner.param_groups:
            g["params"] = []
        for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
            inner.param_groups[optimizer.sub_group_to_group_id[i]]["params"].append(flat)
    masters = [p for g in inner.param_groups for p in g["params"]]
    try:
        if all(p in inner.state and "exp_avg" in inner.state[p] for p in masters):
            return
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        for p in masters:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p in masters:
            p.grad = None
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr
    finally:
        for g, params in zip(inner.param_groups, lists):
            g["params"] = params
    link_optimizer_state(optimizer)


def load_into(owners: list[Owner], saved: SavedState, optimizer, adam_step: int) -> None:
    """Write the saved state into this rank's fragments (any layout), set Adam's step count and
    refresh the compute-dtype weights from the fp32 masters."""
    _ensure_optimizer_state(optimizer)
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(float(adam_step))
        elif "step" in state:
            state["step"] = adam_step
    for o in owners:
        missing = [n for n in (o.name,) if not saved.has(n, MASTER)]
        if missing:
            raise ValueError(f"{saved.directory} holds no state for {missing}")
        layout = tp_layout(o.param)
        for field in (MASTER,) if o.frozen else FIELDS:
            if saved.has(o.name, field):
                shard = saved.local_shard(o.name, field, layout, o.tp_rank, o.tp_size)
                _write_local(o, field, shard.reshape(-1)[o.start: o.start + o.numel])
    _refresh_low_precision(optimizer)


def _write_local(owner: Owner, field: str, value: torch.Tensor) -> None:
    p = owner.param
    if owner.frozen:  # no master: the module's own weights (gathered under ZeRO-3)
        with torch.no_grad():
            if owner.zero3:
                from deepspeed.zero import GatheredParameters

                with GatheredParameters([p], modifier_rank=0):
                    p.copy_(value.view(p.shape).to(p.dtype))
            else:
                p.copy_(value.view(p.shape).to(p.dtype))
        return
    if owner.zero3:
        target = p._z3_optimizer.get_local_fp32_param(p, None if field == MASTER else field)
        target.data[: owner.numel].copy_(value.to(target.device))  # the master is a leaf
        return
    target = (p._hp_mapping.get_hp_fragment() if field == MASTER
              else p._hp_mapping.optim_fragment[field])
    target.data.copy_(value.to(target.device))


def _refresh_low_precision(optimizer) -> None:
    """Copy the fp32 masters into the model's weights, as DeepSpeed does after a step (ZeRO-1/2
    and the BF16 optimizer also all-gather them over the data-parallel ranks)."""
    if hasattr(optimizer, "update_lp_params"):
        optimizer.update_lp_params()
        return
    assert hasattr(optimizer, "fp16_partitioned_groups_flat"), type(optimizer).__name__
    for group in range(len(optimizer.fp16_partitioned_groups_flat)):  # ZeRO-3
        optimizer._reassign_or_swap_out_partitioned_parameters(group)
