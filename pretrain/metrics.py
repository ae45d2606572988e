"""Training metrics: FLOP counting for MFU, and the rank-0 logger (TensorBoard + console line)."""

from __future__ import annotations

import math
from pathlib import Path

# Dense bf16 peak per device (no sparsity), by a substring of the device name. FLOPs per token
# come from the one cost model, model/cost.py.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def peak_flops(device_name: str, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


class MetricsLogger:
    """Writes scalars to TensorBoard and prints one readable line; active on one rank only."""

    def __init__(self, run_dir: Path, active: bool):
        self.active = active
        self.writer = None
        if active:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def print(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.active = False  # closed: nothing more is logged (and closing again is a no-op)


def format_line(step: int, total: int, m: dict[str, float]) -> str:
    depth_losses = [m[k] for k in sorted(m) if k.startswith("loss/depth_") and k != "loss/depth_0"]
    accs = [m[k] for k in sorted(m) if k.startswith("accuracy/depth_")]
    parts = [f"step {step}/{total}", f"loss {m['loss/main']:.4f}"]
    if depth_losses:
        parts.append("mtp " + " ".join(f"{x:.3f}" for x in depth_losses))
    parts.append("acc " + "/".join(f"{x:.2f}" for x in accs))
    if "mtp/weight" in m:
        parts.append(f"λ {m['mtp/weight']:.2f}")
    parts += [f"lr {m['optim/lr']:.2e}", f"gnorm {m['optim/grad_norm']:.3f}",
              f"{m['perf/tokens_per_s'] / 1e3:.1f}k tok/s"]
    if m.get("perf/mfu") is not None:
        parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
    if m.get("memory/peak_gib") is not None:
        parts.append(f"mem {m['memory/peak_gib']:.2f} GiB")
    if m.get("optim/skipped_steps"):
        parts.append(f"skipped {int(m['optim/skipped_steps'])}")
    return " | ".join(parts)
