"""The decoding engine: one model, its KV caches and its captured device graphs, serving requests
one after another — plain or self-speculative, greedy or sampled.

Requests are bucketed: the batch is padded to a batch bucket (rows past the request's batch are
inactive), the cache to a cache-length bucket, the prompts to a prompt bucket. Each (batch
bucket, cache-length bucket) owns one `Slot` of device buffers; each phase — a prefill per
prompt bucket, a plain step, a speculative round, in each sampling mode — is captured as a
device graph the first time it runs in that slot and replayed for every later step and request
(on the CPU, and with `graphs=False`, the same phases run eagerly: same shapes, same
arithmetic). A request then costs a few host-to-device copies, one graph launch per step and one
small device-to-host read per step, which lags one step behind (the device is already running
the next step while the host reads the previous one). Argmax, acceptance, the cache commit, EOS
and the statistics all happen on the device.

Graphs keep the addresses of the slot's buffers, so slots live as long as the engine. All graphs
share one memory pool for their intermediates: they never run at the same time and every value
that outlives a graph is written into a slot buffer.

With TP > 1 every rank of the tensor-parallel group runs the same engine on the same requests:
the collectives (NCCL on GPUs) are captured into the graphs, and the ranks stop after the same
step because each computes the same tokens (the logits are gathered whole, sampling generators
are seeded alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model import accelerator
from model.generation.draft_vocab import DraftVocabulary
from model.generation.drafters import check_drafts
from model.generation.plain import PlainDecoder
from model.generation.runner import Slot, finish, positions_needed
from model.generation.sampling import GREEDY, Sampler, SamplingConfig
from model.generation.speculative import SpeculativeDecoder
from model.generation.stats import GenerationResult
from model.mtp.objective import NO_MTP, objective_class
from model.transformer import MTPLanguageModel

MIN_CACHE_BUCKET = 16
MIN_PROMPT_BUCKET = 8


def bucket(n: int, smallest: int, largest: int | None = None) -> int:
    """The smallest power of two ≥ max(n, smallest), capped at `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return size if largest is None else min(size, largest)


class DecodingEngine:
    """Serves `generate` requests with `model` (eval mode, weights in place for its lifetime:
    graphs replay the addresses of the parameters seen at capture).

    `graphs`: capture and replay device graphs (None: where supported, i.e. on GPUs).
    `compile`: torch.compile the decoding regions first (model.compile.compile_for_decoding;
    None: with graphs at TP = 1 — compiled code between TP collectives would be split into
    pieces, and on the CPU compiling costs more than it saves).
    `draft_vocab`: token ids [K] that speculative drafts are restricted to (the most frequent
    ones: `draft_vocab.most_frequent`); verification still scores the whole vocabulary, so
    outputs do not change, only the draft's cost and its acceptance (model/generation/
    draft_vocab.py). None: drafts over the whole vocabulary.
    `draft_tokens`: drafts per speculative round, N (None: the MTP tail's depth D). Fewer than
    D leaves the deepest depths idle; more than D chains the last DeepSeek module (model/mtp/
    deepseek.py). A round then verifies N + 1 positions: more tokens a round when the deeper
    drafts are accepted often enough to pay for their module and the wider verification."""

    def __init__(self, model: MTPLanguageModel, graphs: bool | None = None,
                 compile: bool | None = None, draft_vocab: torch.Tensor | None = None,
                 draft_tokens: int | None = None):
        if graphs and not accelerator.graphs_supported():
            raise ValueError("device graphs need a GPU; use graphs=False (or None) on the CPU")
        self.model = model
        kind = model.config.mtp.kind
        if kind == NO_MTP and draft_tokens is not None:
            raise ValueError(f"draft_tokens = {draft_tokens} needs an MTP tail to draft with; "
                             "this model has mtp.kind 'none' (drop draft_tokens)")
        self.draft_tokens = None if kind == NO_MTP else check_drafts(
            objective_class(kind).drafter, model.config.mtp.depth, draft_tokens)
        """N, the drafts a speculative round verifies (None: no MTP tail)."""
        self.device = model.embedding.output_weight.device
        self.tp = model.embedding.tp_group.size()
        self.graphs = accelerator.graphs_supported() if graphs is None else graphs
        self.compiled = (self.graphs and self.tp == 1) if compile is None else compile
        if self.compiled:
            from model.compile import compile_for_decoding

            compile_for_decoding(model)
        self.draft_vocab = None if draft_vocab is None else DraftVocabulary(model, draft_vocab)
        self.max_seq_len = model.config.model.max_seq_len
        self.generator = torch.Generator(device=self.device)
        """The device random stream of sampling, reseeded by every request."""
        self._slots: dict[tuple[int, int], Slot] = {}
        self._decoders: dict[tuple, PlainDecoder | SpeculativeDecoder] = {}
        self._samplers: dict[tuple, Sampler] = {}
        self._readers: dict[tuple[int, int], accelerator.LaggedReader] = {}
        self._phases: dict[tuple, Callable[[], None]] = {}
        self._pool = None
        self.captured = 0
        """Graphs captured so far (each costs a first run plus the capture)."""
        self.last_step: Callable[[], None] | None = None
        """The last request's steady-state phase (its replay, or its eager body): calling it
        runs one more step on the slot's final state, all sequences inactive, at the cost of
        any step (benchmarks time it alone)."""

    # ------------------------------------------------------------------ state
    def _slot(self, batch: int, length: int) -> Slot:
        key = (batch, length)
        if key not in self._slots:
            self._slots[key] = Slot(self.model, batch, length)
            self._readers[key] = accelerator.LaggedReader(self._slots[key].active)
        return self._slots[key]

    def _decoder(self, slot: Slot, speculative: bool):
        key = (slot.batch, slot.max_len, speculative)
        if key not in self._decoders:
            self._decoders[key] = (
                SpeculativeDecoder(self.model, slot, self.compiled, self.draft_vocab,
                                   self.draft_tokens)
                if speculative else PlainDecoder(self.model, slot, self.compiled))
        return self._decoders[key]

    def _sampler(self, slot: Slot, mode: str) -> Sampler:
        key = (slot.batch, slot.max_len, mode)
        if key not in self._samplers:
            # A round takes N uniform numbers to accept, one to resample and N to draft.
            draws = 2 * (self.draft_tokens or 0) + 1
            self._samplers[key] = Sampler(mode, slot.temperature, slot.top_p, self.generator,
                                          slot.batch, draws)
        return self._samplers[key]

    def _run(self, key: tuple, body: Callable[[], None]) -> None:
        """Run one phase: replay its graph, or capture it (which runs it once), or run it
        eagerly without graphs."""
        replay = self._phases.get(key)
        if replay is not None:
            replay()
        elif self.graphs:
            replay = accelerator.graph_replayer(body, self._pool, (self.generator,))
            self._pool = self._pool or replay.pool
            self._phases[key] = replay
            self.captured += 1
        else:
            body()

    # ------------------------------------------------------------------ requests
    def check(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
              speculative: bool, topk: int) -> int:
        """Refuse requests the engine cannot serve (ValueError naming the value and the fix);
        returns the cache length the request needs."""
        sampling.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 1")
        width = max(len(p) for p in prompts)
        drafts = None
        if speculative:
            if self.model.config.mtp.kind == NO_MTP:
                raise ValueError("self-speculative decoding needs an MTP tail; this model has "
                                 "mtp.kind 'none' (use plain generation)")
            if topk < 1 or (topk > 1 and not sampling.greedy):
                raise ValueError(f"topk = {topk}: the top-k acceptance relaxation applies to "
                                 "greedy decoding only, with k >= 1")
            drafts = self.draft_tokens
        need = positions_needed(width, max_new_tokens, drafts)
        if need > self.max_seq_len:
            extra = "1" if drafts is None else f"2·drafts + 2 ({2 * drafts + 2})"
            raise ValueError(
                f"prompt ({width}) + max_new_tokens ({max_new_tokens}) + {extra} = {need} "
                f"exceeds model.max_seq_len = {self.max_seq_len}; shorten the prompt or "
                "generate fewer tokens")
        return need

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 sampling: SamplingConfig = GREEDY, eos_id: int | None = None, pad_id: int = 0,
                 speculative: bool = False, topk: int = 1) -> GenerationResult:
        """Continue every prompt by up to `max_new_tokens` tokens (stopping after `eos_id`).
        `speculative`: self-speculative decoding with the model's MTP tail (greedy output is
        identical to plain greedy; sampled output follows the same distribution); `topk` > 1
        relaxes greedy acceptance to the main model's top k (BPD)."""
        need = self.check(prompts, max_new_tokens, sampling, speculative, topk)
        t0 = time.perf_counter()
        captured = self.captured
        b = len(prompts)
        width = max(len(p) for p in prompts)
        length = bucket(need, MIN_CACHE_BUCKET, self.max_seq_len)
        # Compiled regions specialise size 1: with batch buckets from 2 a batch-1 request shares
        # their compilations (a padded row costs nothing a memory-bound step would notice).
        slot = self._slot(bucket(b, 2 if self.compiled else 1), length)
        prompt_width = bucket(width, MIN_PROMPT_BUCKET, length)
        decoder = self._decoder(slot, speculative)
        mode, eos = sampling.mode, eos_id is not None
        sampler = self._sampler(slot, mode)
        slot.load(prompts, max_new_tokens, eos_id, pad_id, prompt_width, sampling.temperature,
                  sampling.top_p)
        self.generator.manual_seed(sampling.seed)
        bucket_key = (slot.batch, slot.max_len, speculative, mode, eos)
        if speculative:
            def step():
                decoder.round(sampler, eos, topk)
            step_key = (*bucket_key, "round", topk)
        else:
            def step():
                decoder.step(sampler, eos)
            step_key = (*bucket_key, "step")

        clock = accelerator.DeviceClock()
        started = clock.mark()
        self._run((*bucket_key, "prefill", prompt_width),
                  lambda: decoder.prefill(prompt_width, sampler, eos))
        prefilled = clock.mark()
        reader = self._readers[(slot.batch, slot.max_len)]
        reader.clear()
        reader.push(slot.active)
        steps = 0
        # Every step adds at least one token to every active sequence.
        while steps < max_new_tokens - 1:
            if reader.ready() and not reader.pop().any():
                break
            self._run(step_key, step)
            steps += 1
            reader.push(slot.active)
        reader.clear()
        done = clock.mark()
        self.last_step = self._phases.get(step_key, step)

        # One read: the tokens up to the furthest any sequence can reach, m, the statistics.
        end = min(slot.max_len, width + max_new_tokens + (self.draft_tokens or 0) + 1)
        parts = [slot.tokens[:b, :end], slot.m[:b, None]]
        if speculative:
            parts.append(decoder.rounds_by_accepted[:b])
        host = torch.cat(parts, dim=1).cpu()
        seconds = time.perf_counter() - t0
        tokens, m = host[:, :end], host[:, end].tolist()
        generated = [tokens[i, len(p): m[i] + 1].tolist() for i, p in enumerate(prompts)]
        stats = decoder.stats(host[:, end + 1:]) if speculative else None
        return GenerationResult(
            finish(generated, max_new_tokens, eos_id), seconds, stats,
            prefill_seconds=clock.seconds(started, prefilled),
            decode_seconds=clock.seconds(prefilled, done), steps=steps,
            captured=self.captured - captured)


def generate(model: MTPLanguageModel, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, eos_id: int | None = None, pad_id: int = 0,
             graphs: bool | None = None) -> GenerationResult:
    """Plain decoding of one request by a fresh engine (captures its graphs anew: to serve
    several requests, keep a `DecodingEngine`)."""
    return DecodingEngine(model, graphs, compile=False).generate(
        prompts, max_new_tokens, sampling, eos_id, pad_id)


def generate_speculative(model: MTPLanguageModel, prompts: list[list[int]], max_new_tokens: int,
                         sampling: SamplingConfig = GREEDY, eos_id: int | None = None,
                         pad_id: int = 0, topk: int = 1,
                         graphs: bool | None = None) -> GenerationResult:
    """Self-speculative decoding of one request by a fresh engine (see `generate`)."""
    return DecodingEngine(model, graphs, compile=False).generate(
        prompts, max_new_tokens, sampling, eos_id, pad_id, speculative=True, topk=topk)
