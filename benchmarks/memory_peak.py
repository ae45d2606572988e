"""What is live at the peak of a GPU allocator history, as text (for runs on remote machines).

    python benchmarks/memory_peak.py RUN_DIR/memory/rank00000.pickle [--top 20]

The history comes from `train.memory_snapshot_steps` (pretrain/memory_snapshot.py). The trace is
replayed (allocations, and frees once the allocator has them back) to find the moment the most
memory was allocated; the blocks live then are grouped by the innermost stack frame in this
project's code (model/, pretrain/, data_pipeline/), else in DeepSpeed or megatron-core, else
torch, and printed largest first. Blocks allocated before the recorded window (its ring buffer
keeps the newest events) count as live from the start: those the trace frees later, and those
still allocated when the file was written.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

GIB = 2**30
OURS = ("/model/", "/pretrain/", "/data_pipeline/")
LIBRARIES = ("/deepspeed/", "/megatron/")


def where(frames: list[dict]) -> str:
    """The innermost frame of ours, else of a library we build on, else the innermost Python
    frame, as 'path:line function' (path from the package directory on)."""
    for marks in (OURS, LIBRARIES):
        for f in frames:
            name = f.get("filename", "")
            hit = next((m for m in marks if m in name), None)
            if hit is not None:
                return f"{name[name.index(hit) + 1:]}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{f['filename'].rsplit('/site-packages/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "<no Python frame>"


def _live_before(snapshot: dict, events: list[dict], device: int, frees: str) -> dict:
    """Blocks allocated before the recorded window: freed in it without an allocation in it,
    or still allocated when the file was written without an allocation in it."""
    live: dict[int, tuple[int, str]] = {}
    seen: set[int] = set()
    for e in events:
        if e["action"] == "alloc":
            seen.add(e["addr"])
        elif e["action"] == frees and e["addr"] not in seen and e["addr"] not in live:
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
    for seg in snapshot["segments"]:
        if seg.get("device", device) != device:
            continue
        for b in seg["blocks"]:
            if b["state"] == "active_allocated" and b["address"] not in seen:
                live[b["address"]] = (b["size"], where(b.get("frames", [])))
    return live


def peak(snapshot: dict, device: int = 0) -> tuple[int, float, dict[str, int]]:
    """(bytes allocated at the peak, µs from the first event to it, bytes live then per
    `where`)."""
    events = snapshot["device_traces"][device]
    frees = "free_completed" if any(e["action"] == "free_completed" for e in events) \
        else "free_requested"

    def replay(upto: int | None):
        live = _live_before(snapshot, events, device, frees)
        current = sum(size for size, _ in live.values())
        best, best_at = current, -1
        for i, e in enumerate(events if upto is None else events[:upto + 1]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], where(e.get("frames", [])))
                current += e["size"]
                if current > best:
                    best, best_at = current, i
            elif e["action"] == frees and e["addr"] in live:
                current -= live.pop(e["addr"])[0]
        return best, best_at, live

    best, best_at, _ = replay(None)
    _, _, live = replay(best_at)  # what was live at that moment
    groups: dict[str, int] = defaultdict(int)
    for size, key in live.values():
        groups[key] += size
    start = events[0].get("time_us", 0.0)
    at = events[best_at].get("time_us", start) - start if best_at >= 0 else 0.0
    return best, at, dict(groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("snapshot", help="a pickle written by train.memory_snapshot_steps")
    p.add_argument("--device", type=int, default=0, help="device index in the file (default 0)")
    p.add_argument("--top", type=int, default=20, help="groups to print (default 20)")
    args = p.parse_args()
    try:
        with open(args.snapshot, "rb") as f:
            snapshot = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise SystemExit(f"cannot read {args.snapshot}: {err}") from None
    traces = snapshot.get("device_traces", []) if isinstance(snapshot, dict) else []
    if not 0 <= args.device < len(traces) or not traces[args.device]:
        raise SystemExit(f"{args.snapshot} has no allocation history for device {args.device} "
                         f"(devices with one: {[i for i, t in enumerate(traces) if t]})")
    best, t_us, groups = peak(snapshot, args.device)
    print(f"peak allocated: {best / GIB:.2f} GiB at {t_us / 1e6:.3f} s into the trace; live then:")
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    for key, size in ranked[:args.top]:
        print(f"{size / GIB:8.2f} GiB  {key}")
    rest = sum(size for _, size in ranked[args.top:])
    if rest:
        print(f"{rest / GIB:8.2f} GiB  ({len(ranked) - args.top} more places)")


if __name__ == "__main__":
    main()
