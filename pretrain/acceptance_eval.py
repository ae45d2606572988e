"""Real draft acceptance as a periodic validation metric of the trainer (PP = 1, ZeRO ≤ 2: the
whole model and its unpartitioned weights are on every rank of a TP group)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model import accelerator
from model.generation.acceptance import real_acceptance


def acceptance_metrics(model, val_batches, num_prompts: int, prompt_len: int, new_tokens: int,
                       dp_group, graphs: bool) -> dict[str, float]:
    """Greedy self-speculative decoding from this DP rank's held-out prompts; statistics summed
    over data-parallel ranks (TP peers hold the same prompts and run the same loop)."""
    prompts: list[list[int]] = []
    for batch in val_batches:
        prompts += [row[:prompt_len].tolist() for row in batch["input_ids"]]
        if len(prompts) >= num_prompts:
            break
    st = real_acceptance(model, prompts[:num_prompts], new_tokens, graphs=graphs)
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
