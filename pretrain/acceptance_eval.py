"""Real draft acceptance as a periodic validation metric of the trainer (PP = 1, ZeRO ≤ 2: the
whole model and its unpartitioned weights are on every rank of a TP group)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model import accelerator
from model.generation import DecodingEngine
from model.generation.acceptance import real_acceptance


def acceptance_metrics(engine: DecodingEngine, val_batches, num_prompts: int, prompt_len: int,
                       new_tokens: int, dp_group) -> dict[str, float]:
    """Greedy self-speculative decoding from this DP rank's held-out prompts with the trainer's
    decoding engine (its graphs are captured at the first evaluation and replayed at every later
    one: they read the weights in place); statistics summed over data-parallel ranks (TP peers
    hold the same prompts and run the same loop)."""
    prompts: list[list[int]] = []
    for batch in val_batches:
        prompts += [row[:prompt_len].tolist() for row in batch["input_ids"]]
        if len(prompts) >= num_prompts:
            break
    st = real_acceptance(engine, prompts[:num_prompts], new_tokens)
    vec = torch.tensor([st.main_forwards, st.tokens, *st.proposed, *st.accepted],
                       dtype=torch.float64, device=accelerator.current_device())
    dist.all_reduce(vec, group=dp_group)
    vec = vec.cpu()
    depth = len(st.proposed)
    forwards, tokens = vec[0].item(), vec[1].item()
    out = {"val/acceptance/tokens_per_forward": tokens / forwards if forwards else 0.0}
    for j in range(depth):
        proposed, accepted = vec[2 + j].item(), vec[2 + depth + j].item()
        out[f"val/acceptance/depth_{j + 1}"] = accepted / proposed if proposed else 0.0
    return out
