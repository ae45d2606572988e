"""Learning-rate and MTP-weight (λ) schedules: pure functions of the step / consumed tokens, so a
resumed run recomputes exactly the values an uninterrupted run would use."""

from __future__ import annotations

import bisect
import math

from pretrain.config import MTPWeightConfig, OptimConfig


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then (`cfg.schedule`) a cosine decay to
    `min_lr` at `total_steps`, or lr held until the final decay of `decay_steps(...)` steps,
    linear to `min_lr` at `total_steps`. `step` is the index of the optimizer step about to be
    taken (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay = decay_steps(cfg, total_steps)
        start = max(cfg.warmup_steps, total_steps - decay)
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    """The length of a warmup-stable-decay schedule's final decay."""
    if cfg.decay_steps is not None:
        return cfg.decay_steps
    return max(1, round(cfg.decay_fraction * total_steps))


class MTPWeightSchedule:
    """λ as a step function of consumed tokens (DeepSeek-V3: 0.3 for the first 10T, then 0.1)."""

    def __init__(self, cfg: MTPWeightConfig):
        self.values = list(cfg.values)
        self.boundaries = list(cfg.boundaries_tokens)

    def __call__(self, consumed_tokens: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, consumed_tokens)]

    def state_dict(self) -> dict:
        return {"values": self.values, "boundaries_tokens": self.boundaries}

    def load_state_dict(self, state: dict) -> None:
        if state["values"] != self.values or state["boundaries_tokens"] != self.boundaries:
            raise ValueError(
                f"the checkpoint's λ schedule {state} differs from the config's "
                f"{self.state_dict()}; resume with the same mtp_weight settings")
