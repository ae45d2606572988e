"""Generation results and self-speculative decoding statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculativeStats:
    depth: int
    """Draft positions a round: the drafts it verifies, N (the MTP depth D unless the decoding
    engine was asked for another count)."""
    proposed: list[int] = field(default_factory=list)
    """Drafts proposed at each position j = 1..N (one per active sequence and round)."""
    accepted: list[int] = field(default_factory=list)
    """Drafts accepted at each depth (a draft counts only if all before it were accepted)."""
    main_forwards: int = 0
    """Verification forwards of the main model (prefill not counted)."""
    tokens: int = 0
    """Tokens produced by those forwards (accepted drafts + the main model's own token)."""

    def __post_init__(self):
        self.proposed = self.proposed or [0] * self.depth
        self.accepted = self.accepted or [0] * self.depth

    @classmethod
    def total(cls, parts: list[SpeculativeStats]) -> SpeculativeStats:
        """The statistics of several requests decoded with the same number of drafts."""
        out = cls(parts[0].depth)
        for st in parts:
            assert st.depth == out.depth, (st.depth, out.depth)
            out.main_forwards += st.main_forwards
            out.tokens += st.tokens
            out.proposed = [a + b for a, b in zip(out.proposed, st.proposed)]
            out.accepted = [a + b for a, b in zip(out.accepted, st.accepted)]
        return out

    def acceptance_rate(self) -> list[float]:
        """P(draft j accepted), over all rounds (the first entry is DeepSeek's 'second token')."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    def conditional_acceptance(self) -> list[float]:
        """P(draft j accepted | drafts 1..j-1 accepted)."""
        out, prev = [], None
        for j, a in enumerate(self.accepted):
            base = self.proposed[j] if j == 0 else prev
            out.append(a / base if base else 0.0)
            prev = a
        return out

    def mean_tokens_per_forward(self) -> float:
        return self.tokens / self.main_forwards if self.main_forwards else 0.0

    def to_dict(self) -> dict:
        return {"depth": self.depth, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate(),
                "conditional_acceptance": self.conditional_acceptance(),
                "main_forwards": self.main_forwards, "tokens": self.tokens,
                "mean_tokens_per_forward": self.mean_tokens_per_forward()}


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """Generated tokens per prompt (prompt excluded), cut after EOS or at max_new_tokens."""
    seconds: float
    """The whole request, host clock: from the call to the tokens on the host."""
    stats: SpeculativeStats | None = None
    prefill_seconds: float | None = None
    """Device time of the prefill (on GPUs from events; it includes a graph capture where the
    request made one)."""
    decode_seconds: float | None = None
    """Device time from the end of the prefill to the end of the last step: the steady state
    (it includes the step that the host's one-step-late read lets run past the end)."""
    steps: int = 0
    """Decoding steps (plain) or rounds (speculative) run after the prefill."""
    captured: int = 0
    """Device graphs captured during this request (0 once the engine has seen its buckets)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def to_dict(self) -> dict:
        out = {"num_sequences": len(self.tokens), "num_tokens": self.num_tokens,
               "seconds": self.seconds,
               "tokens_per_second": self.num_tokens / self.seconds if self.seconds else 0.0,
               "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
               "steps": self.steps, "graphs_captured": self.captured}
        if self.stats is not None:
            out["speculative"] = self.stats.to_dict()
        return out
