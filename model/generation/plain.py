"""Plain autoregressive decoding with a KV cache: prefill, then one main-model forward per token
(the reference that speculative decoding must reproduce).

Both phases have static shapes (a prompt bucket, one token per sequence with whole-cache
attention through the position mask) and keep their state on the device, so the decoding
engine captures each once as a device graph and replays it for every later step and request.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from model.generation.runner import Slot, main_forward
from model.generation.sampling import Sampler
from model.transformer import MTPLanguageModel


class PlainDecoder:
    """Plain decoding of the sequences in a slot; the engine calls (or replays) `prefill` once
    per request and `step` until no sequence is active. `compiled`: run the step's work after
    the main model's blocks (final norm, head, choice, commit) as one compiled region."""

    def __init__(self, model: MTPLanguageModel, slot: Slot, compiled: bool = False):
        self.model, self.slot = model, slot
        self._commit = torch.compile(self._choose_and_commit, dynamic=True) if compiled else \
            self._choose_and_commit

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.embedding.logits(self.model.tail.final_norm(h))

    def prefill(self, width: int, sampler: Sampler, check_eos: bool) -> None:
        """The prompts (right-padded to `width`) into the cache; the first token at index m =
        prompt length."""
        s = self.slot
        with record_function("decode.prefill"):
            s.start()
            sampler.draw()
            h = main_forward(self.model, s.cache, s.tokens[:, :width], s.positions[:, :width],
                             width)
            last = h[s.rows, s.m - 1]  # [B, d]: each prompt's last position
            first, _ = sampler.pick(self._head(last))  # [B]
            s.tokens[s.rows, s.m] = first
            s.finish_step(first == s.eos if check_eos else None)

    def step(self, sampler: Sampler, check_eos: bool) -> None:
        """One token for every sequence: feed tokens[m] at position m, write the choice at m+1
        and advance the active sequences."""
        s = self.slot
        sampler.draw()
        with record_function("decode.main"):  # profiler ranges (benchmarks/bench_generation.py)
            token = s.tokens.gather(1, s.m[:, None])  # [B, 1]
            h = main_forward(self.model, s.cache, token, s.m[:, None], s.max_len)
        with record_function("decode.commit"):
            self._commit(h[:, 0], sampler, check_eos)

    def _choose_and_commit(self, h: torch.Tensor, sampler: Sampler, check_eos: bool) -> None:
        s = self.slot
        nxt, _ = sampler.pick(self._head(h))  # [B]
        s.tokens[s.rows, s.m + 1] = nxt  # indexed: in place when compiled (put_rows)
        s.m.add_(s.active)
        s.finish_step(nxt == s.eos if check_eos else None)
