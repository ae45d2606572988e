"""The GPU allocator's history over the first steps of a run (train.memory_snapshot_steps).

Recording starts before the engine is built, so the weights, gradients and optimizer states are
in the history with the stacks that allocated them, beside every activation, loss chunk and
communication buffer of the steps recorded. Each rank writes RUN_DIR/memory/rankNNNNN.pickle
after the last recorded step, when a step in the window runs out of memory (the pickle then
shows what filled the card), or when the run stops earlier. https://pytorch.org/memory_viz opens
the file: the peak, what was live at it, and where each block came from.
"""

from __future__ import annotations

from pathlib import Path

from model import accelerator


class MemorySnapshot:
    def __init__(self, steps: int, run_dir: Path, rank: int):
        self.steps_left = steps
        self.path = run_dir / "memory" / f"rank{rank:05d}.pickle"
        if steps:
            accelerator.record_memory_history(True)

    @property
    def recording(self) -> bool:
        return self.steps_left > 0

    def step_done(self) -> Path | None:
        """After each training step: the file's path once the last recorded step is done."""
        if not self.recording:
            return None
        self.steps_left -= 1
        return self._write() if self.steps_left == 0 else None

    def stop(self) -> Path | None:
        """Write what was recorded so far (training ended early, or failed) and stop."""
        if not self.recording:
            return None
        self.steps_left = 0
        return self._write()

    def _write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            accelerator.dump_memory_history(str(self.path))
        finally:
            accelerator.record_memory_history(False)
        return self.path
