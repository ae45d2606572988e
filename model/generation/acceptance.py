"""Real draft acceptance: self-speculative greedy decoding from held-out prompts, with drafts
judged against the main model's own greedy continuation (not the ground-truth text)."""

from __future__ import annotations

import torch

from model.generation.speculative import generate_speculative
from model.generation.stats import SpeculativeStats
from model.transformer import MTPLanguageModel


@torch.no_grad()
def real_acceptance(model: MTPLanguageModel, prompts: list[list[int]], new_tokens: int,
                    batch_size: int = 16, graphs: bool | None = None) -> SpeculativeStats:
    """Greedy speculative decoding of `new_tokens` after each prompt; the summed statistics.
    `graphs`: replay rounds as captured device graphs (None: where supported)."""
    was_training = model.training
    model.eval()
    total = SpeculativeStats(model.config.mtp.depth)
    for i in range(0, len(prompts), batch_size):
        st = generate_speculative(model, prompts[i : i + batch_size], new_tokens,
                                  graphs=graphs).stats
        total.main_forwards += st.main_forwards
        total.tokens += st.tokens
        total.proposed = [a + b for a, b in zip(total.proposed, st.proposed)]
        total.accepted = [a + b for a, b in zip(total.accepted, st.accepted)]
    model.train(was_training)
    return total
