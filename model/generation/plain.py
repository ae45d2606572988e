"""Plain autoregressive generation with a KV cache: prefill, then one main-model forward per
token (the reference that speculative decoding must reproduce).

Greedy decoding steps have fixed shapes (one token per sequence, whole-cache attention through
the position mask) and keep their state (next token, position) on the device, so on GPUs each
step is replayed as one captured device graph; sampling steps draw on the host and stay eager.
"""

from __future__ import annotations

import time

import torch

from model import accelerator
from model.generation.runner import (
    check_fits,
    done,
    finish,
    main_forward,
    new_cache,
    pad_prompts,
)
from model.generation.sampling import GREEDY, SamplingConfig, choose
from model.generation.stats import GenerationResult
from model.transformer import MTPLanguageModel


class _GreedyStep:
    """One greedy token for every sequence: feeds `token` [B] at `position` [B], writes the
    model's choice back into `token` and advances `position` — all in place (graph replay)."""

    def __init__(self, model: MTPLanguageModel, cache, token: torch.Tensor,
                 position: torch.Tensor, static: bool):
        self.model, self.cache, self.token, self.position = model, cache, token, position
        self.static = static
        self.host_max = int(position.max())  # dynamic mode: the attended cache length - 1

    def __call__(self) -> None:
        model = self.model
        if self.static:
            attend = self.cache.max_len
        else:
            self.host_max += 1
            attend = self.host_max
        h = main_forward(model, self.cache, self.token[:, None], self.position[:, None], attend)
        logits = model.embedding.logits(model.tail.final_norm(h[:, 0]))  # [B, V]
        self.token.copy_(logits.argmax(dim=-1))
        self.position.add_(1)


@torch.no_grad()
def generate(model: MTPLanguageModel, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, eos_id: int | None = None,
             pad_id: int = 0, graphs: bool | None = None, static: bool = False) -> GenerationResult:
    """`graphs`: replay greedy steps as a captured device graph (None: on GPUs at TP = 1).
    `static`: greedy steps with the fixed shapes capture needs, even without graphs (tests)."""
    sampling.validate()
    device = model.embedding.output_weight.device
    if graphs is None:
        graphs = accelerator.graphs_supported() and model.embedding.tp_group.size() == 1
    t0 = time.perf_counter()
    tokens, lengths = pad_prompts(prompts, pad_id, device)
    b, width = tokens.shape
    max_len = check_fits(width, max_new_tokens, model.config.model.max_seq_len)
    cache = new_cache(model, len(model.blocks), b, max_len, device)
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)

    positions = torch.arange(width, device=device).expand(b, width)
    h = main_forward(model, cache, tokens, positions, width)
    last = h[torch.arange(b, device=device), lengths - 1]  # [B, d]: each prompt's last position
    logits = model.embedding.logits(model.tail.final_norm(last))  # [B, V]
    token = choose(logits if sampling.greedy else logits.cpu(), sampling, gen).to(device)  # [B]
    generated: list[list[int]] = [[t] for t in token.tolist()]
    position = lengths.clone()  # where `token` goes
    if sampling.greedy:
        step = _GreedyStep(model, cache, token, position, static=graphs or static)
        run = None
        while not all(done(generated, max_new_tokens, eos_id)):
            if run is None:  # the first step runs while it is captured (graphs) or plainly
                run = accelerator.graph_replayer(step) if graphs else step
                if not graphs:
                    run()
            else:
                run()
            for i, t in enumerate(token.tolist()):
                generated[i].append(t)
    else:
        host_max = int(lengths.max())
        while not all(done(generated, max_new_tokens, eos_id)):
            host_max += 1
            h = main_forward(model, cache, token[:, None], position[:, None], host_max)
            position += 1
            logits = model.embedding.logits(model.tail.final_norm(h[:, 0]))
            token = choose(logits.cpu(), sampling, gen).to(device)
            for i, t in enumerate(token.tolist()):
                generated[i].append(t)
    return GenerationResult(finish(generated, max_new_tokens, eos_id), time.perf_counter() - t0)
