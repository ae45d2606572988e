"""Real draft acceptance: self-speculative greedy decoding from held-out prompts, with drafts
judged against the main model's own greedy continuation (not the ground-truth text)."""

from __future__ import annotations

import torch

from model.generation.engine import DecodingEngine
from model.generation.stats import SpeculativeStats


@torch.no_grad()
def real_acceptance(engine: DecodingEngine, prompts: list[list[int]], new_tokens: int,
                    batch_size: int = 16) -> SpeculativeStats:
    """Greedy speculative decoding of `new_tokens` after each prompt, `batch_size` prompts per
    request; the summed statistics. The model is put in eval mode for the duration."""
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        parts = [engine.generate(prompts[i: i + batch_size], new_tokens, speculative=True).stats
                 for i in range(0, len(prompts), batch_size)]
    finally:
        model.train(was_training)
    return SpeculativeStats.total(parts)
