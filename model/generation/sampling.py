"""Token choice from logits: greedy, or sampling with temperature and nucleus (top-p) filtering."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 means greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int = 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingConfig()
"""The default: greedy decoding."""


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] logits → the (temperature-scaled, top-p-filtered, renormalised) fp32 probs.
    This is the distribution that sampling — plain or speculative — reproduces exactly."""
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (the top token is always kept).
        keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < cfg.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[..., V] probs → [...] token ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """[..., V] → [...] tokens (argmax when greedy)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return sample(probabilities(logits, cfg), generator)
