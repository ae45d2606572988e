"""Token choice from logits: greedy, or sampling with temperature and nucleus (top-p) filtering,
all on the device so that decoding steps that sample are replayed from captured graphs too."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_MODE, SAMPLE_MODE, TOP_P_MODE = "greedy", "sample", "top-p"


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 means greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int = 0
    """Seeds the request's random numbers (the decoding engine reseeds its device generator
    with it at every request, so a request's output does not depend on earlier requests)."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def mode(self) -> str:
        """What a captured graph must do: argmax, sample, or sample after the top-p filter (a
        sort of the vocabulary, which plain temperature sampling does without)."""
        if self.greedy:
            return GREEDY_MODE
        return TOP_P_MODE if self.top_p < 1 else SAMPLE_MODE


GREEDY = SamplingConfig()
"""The default: greedy decoding."""


def _probabilities(logits: torch.Tensor, temperature, top_p, filter_top_p: bool) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if filter_top_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (the top token is always kept).
        keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] logits → the (temperature-scaled, top-p-filtered, renormalised) fp32 probs.
    This is the distribution that sampling — plain or speculative — reproduces exactly."""
    return _probabilities(logits, cfg.temperature, cfg.top_p, cfg.top_p < 1)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[..., V] probabilities (each row's sum may differ from 1) and one uniform number in [0, 1)
    per row ([..., 1]) → [...] token ids, exactly distributed as the rows (inverse CDF: as
    torch.multinomial draws one sample, but with no host synchronisation). Zero-probability
    tokens have empty intervals and are never drawn."""
    cdf = probs.cumsum(dim=-1)
    u = u * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


class Sampler:
    """How decoding chooses tokens, in a form that a captured graph can replay for any request:
    the mode (greedy, sample, top-p) is fixed when the graph is captured; the temperature and
    top-p live in device tensors that each request refills; random numbers come from a device
    generator that each request reseeds.

    The random numbers of a phase (a prefill, a step, a round) are drawn at its start into
    `noise` [batch, draws] (`draw`), outside the compiled regions — dynamo cannot trace a call
    that takes a generator, and each such call split a region — and taken in order inside them
    (`uniform`). Every phase takes them in the same order, so a phase traced or captured once
    reads the same columns on every replay."""

    def __init__(self, mode: str, temperature: torch.Tensor, top_p: torch.Tensor,
                 generator: torch.Generator, batch: int = 1, draws: int = 1):
        """`batch`: sequences per phase; `draws`: the most uniform numbers per sequence that one
        phase takes."""
        self.mode, self.temperature, self.top_p, self.generator = mode, temperature, top_p, generator
        self.noise = torch.zeros(batch, draws, device=temperature.device)
        self._taken = 0

    @property
    def greedy(self) -> bool:
        return self.mode == GREEDY_MODE

    def draw(self) -> None:
        """Refill `noise` from the request's generator (in place: a replayed graph writes the
        address it captured) and start taking from its first column. Called eagerly at the start
        of every phase."""
        if not self.greedy:
            self.noise.uniform_(generator=self.generator)
        self._taken = 0

    def uniform(self, n: int) -> torch.Tensor:
        """The phase's next `n` uniform numbers per sequence [B, n]."""
        assert self._taken + n <= self.noise.shape[1], (
            f"a phase took more than the {self.noise.shape[1]} random numbers it was given")
        u = self.noise[:, self._taken: self._taken + n]
        self._taken += n
        return u

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """As `probabilities`, with this request's values."""
        return _probabilities(logits, self.temperature, self.top_p, self.mode == TOP_P_MODE)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [B, V] → token ids [B]."""
        return sample(probs, self.uniform(1))

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, V] logits → (tokens [B], the probabilities they were drawn from, or None when
        greedy)."""
        if self.greedy:
            return logits.argmax(dim=-1), None
        probs = self.probabilities(logits)
        return self.sample(probs), probs
