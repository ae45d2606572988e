"""Plain autoregressive generation with a KV cache: prefill, then one main-model forward per
token (the reference that speculative decoding must reproduce)."""

from __future__ import annotations

import time

import torch

from model.generation.runner import done, finish, main_forward, new_cache, pad_prompts
from model.generation.sampling import GREEDY, SamplingConfig, choose
from model.generation.stats import GenerationResult
from model.transformer import MTPLanguageModel


@torch.no_grad()
def generate(model: MTPLanguageModel, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, eos_id: int | None = None,
             pad_id: int = 0) -> GenerationResult:
    sampling.validate()
    device = model.embedding.output_weight.device
    t0 = time.perf_counter()
    tokens, lengths = pad_prompts(prompts, pad_id, device)
    b, width = tokens.shape
    max_len = width + max_new_tokens + 1
    if max_len > model.config.model.max_seq_len:
        raise ValueError(
            f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len = "
            f"{model.config.model.max_seq_len}")
    cache = new_cache(model, len(model.blocks), b, max_len, device)
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)

    positions = torch.arange(width, device=device).expand(b, width)
    h = main_forward(model, cache, tokens, positions, width)
    last = h[torch.arange(b, device=device), lengths - 1]  # [B, d]: each prompt's last position
    generated: list[list[int]] = [[] for _ in range(b)]
    pos = lengths.clone()  # position of the token about to be fed
    host_max = int(lengths.max())
    while True:
        logits = model.embedding.logits(model.tail.final_norm(last))  # [B, V]
        nxt = choose(logits if sampling.greedy else logits.cpu(), sampling, gen)  # [B]
        for i, t in enumerate(nxt.tolist()):
            generated[i].append(t)
        if all(done(generated, max_new_tokens, eos_id)):
            break
        host_max += 1
        h = main_forward(model, cache, nxt.to(device)[:, None], pos[:, None], host_max)
        last = h[:, 0]
        pos += 1
    return GenerationResult(finish(generated, max_new_tokens, eos_id), time.perf_counter() - t0)
