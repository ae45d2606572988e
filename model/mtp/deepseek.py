"""DeepSeek-V3 MTP: D sequential modules that keep the causal chain from depth to depth.

For k = 1..D:  h'ᵏ = Mₖ [RMSNorm(hᵏ⁻¹) ; RMSNorm(Emb(t_{i+k}))],  hᵏ = TRMₖ(h'ᵏ),
logitsᵏ = Head(RMSNormₖ(hᵏ)) predicts t_{i+k+1}. h⁰ is the main model's final-norm output and
t_{i+k} = labels[k-1][i], so the last pipeline stage needs nothing but the labels.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import RowParallelLinear
from torch import nn

from model.attention import DocumentMask
from model.block import TransformerBlock
from model.config import DecoderConfig
from model.generation.drafters import Drafter, put_rows, rows_at
from model.init import normal_init
from model.kv_cache import LayerCache
from model.mtp.objective import MTPObjective, Option, TailInputs
from model.norm import make_norm
from model.parallel import ParallelContext
from model.tp_regions import gather_sequence, row_parallel, scatter_to_tp_last_dim


class DeepSeekModule(nn.Module):
    """One depth: two input norms, the 2d→d projection, a transformer block, an output norm."""

    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__()
        cfg = dcfg.model
        d = cfg.hidden_size
        self.hidden_norm = make_norm(d, cfg.norm_eps, ctx)
        self.embed_norm = make_norm(d, cfg.norm_eps, ctx)
        # Row-parallel over the 2d input features [RMSNorm(h); RMSNorm(e)]: each rank multiplies
        # its slice of the input and the partial outputs are summed over TP (all-reduced, or
        # reduce-scattered back to sequence shards under sequence parallelism).
        self.tp_group = ctx.tp_group
        self.sp_group = ctx.sp_group
        self.proj = RowParallelLinear(
            2 * d, d, config=ctx.megatron_config(), init_method=normal_init(cfg.init_std),
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=ctx.tp_group)
        self.block = TransformerBlock(cfg, ctx)
        self.out_norm = make_norm(d, cfg.norm_eps, ctx)
        self._compiled_mix = None  # see compile_training_forward
        self._compiled_decoding_mix = None  # see compile_decoding_forward

    def compile_training_forward(self) -> list[nn.Module]:
        """Compile the input mix (both norms and the concat: one kernel each way). The block
        and the output norm are compiled as regions of their own; the projection stays eager
        because its TP collective is an autograd function outside the graph."""
        self._compiled_mix = torch.compile(self._mix)
        return [self.hidden_norm, self.embed_norm]

    def compile_decoding_forward(self) -> list[nn.Module]:
        """Compile the input mix for decoding too (the block and the output norm are regions of
        their own)."""
        self._compiled_decoding_mix = torch.compile(self._mix, dynamic=True)
        return [self.hidden_norm, self.embed_norm]

    def _mix(self, h_prev: torch.Tensor, next_embed: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.hidden_norm(h_prev), self.embed_norm(next_embed)), dim=-1)

    def forward(self, h_prev: torch.Tensor, next_embed: torch.Tensor,
                cache: LayerCache | None = None, mask: DocumentMask | None = None) -> torch.Tensor:
        """h_prev, next_embed [B, T, d] → hᵏ [B, T, d] (before the output norm; [B, T/TP, d]
        sequence shards under sequence parallelism)."""
        mix = self._compiled_mix if cache is None else self._compiled_decoding_mix
        if mix is None:  # not `mix or …`: torch 2.11's dynamo breaks the graph on that branch
            mix = self._mix
        x = mix(h_prev, next_embed)  # [B, T, 2d]
        if self.sp_group is not None:
            # Gather the sequence, keep this rank's input features; the backward's zero-filled
            # feature gradients are summed over ranks by the gather's reduce-scatter.
            x = gather_sequence(x, self.sp_group)  # [B, T, 2d]
            # contiguous: the projection saves its input, and a view would keep the whole
            # gathered [B, T, 2d] alive until the backward.
            x = x.chunk(self.tp_group.size(), dim=-1)[self.tp_group.rank()].contiguous()
            x = row_parallel(self.proj, x, sequence_parallel=True)  # [B, T/TP, d]
        else:
            x = row_parallel(self.proj, scatter_to_tp_last_dim(x, self.tp_group))  # [B, T, d]
        return self.block(x, cache, mask)


class DeepSeekDrafter(Drafter):
    """Chains the D modules: module k at position i reads hᵏ⁻¹ᵢ and Emb(t_{i+k}). Entries whose
    t_{i+k} is final are kept; the last k-1 entries of module k used drafts and are redone on the
    next round (its cache length stops before them: that is the rollback).

    Drafts past the depth (N > D) reapply module D one position further on each time, reading
    its own output in place of hᴰ⁻¹ there: hᴰᵢ and hᴰ⁻¹ᵢ₊₁ both predict t_{i+D+1}, so the
    module reads what it was trained on, up to the error of its own prediction (the feature
    recurrence of EAGLE; the DeepSeek-V3 report suggests reusing the modules to draft). Those
    entries of module D's cache lie at positions ≥ m and are redone like the others."""

    chains = True

    def __init__(self, *args):
        super().__init__(*args)
        mods = self.model.tail.objective.layers
        d = self.model.config.model.hidden_size
        self.caches = self._block_caches(m.block for m in mods)
        self.hidden = [torch.zeros(self.batch, self.max_len, d, dtype=self.dtype,
                                   device=self.device) for _ in mods]
        self.valid = [torch.zeros(self.batch, dtype=torch.long, device=self.device) for _ in mods]

    def catch_up(self, tokens, trunk, normed, m):
        mods = self.model.tail.objective.layers
        drafts, probs = [], []
        prev_hidden = normed  # h⁰: the final-norm output
        for k, module in enumerate(mods[: self.drafts], start=1):
            # Module k's cache stops k - 1 positions before the previous m, and a round moves m
            # by at most N + 1: the window is at most N + k wide.
            positions, last = self._window(self.valid[k - 1], m, self.drafts + k)
            h_in = rows_at(prev_hidden, positions)  # [B, W, d]
            future = tokens.gather(1, (positions + k).clamp(max=tokens.shape[1] - 1))  # t_{i+k}
            h = module(h_in, self.model.embedding.embed(future),
                       self.caches[k - 1].layer(0, positions, self.max_len))  # [B, W, d]
            put_rows(self.hidden[k - 1], positions, h)
            h_last = h[self.rows, last]  # [B, d]
            tok, p = self._pick(module.out_norm(h_last))
            tokens[self.rows, m + k] = tok
            drafts.append(tok)
            probs.append(p)
            self.valid[k - 1].copy_((m - k + 1).clamp(min=0))
            prev_hidden = self.hidden[k - 1]
        last_module, cache = mods[-1], self.caches[-1]
        for j in range(self.depth + 1, self.drafts + 1):
            # Draft j: module D at position i = m - 1 + j - D reads Emb(t_{i+D}) = Emb(draft
            # j - 1) and, for hᴰ⁻¹ᵢ, its own output at i - 1.
            position = (m - 1 + j - self.depth).clamp(max=self.max_len - 1)[:, None]  # [B, 1]
            future = tokens[self.rows, m + j - 1][:, None]  # [B, 1]
            h = last_module(h_last[:, None], self.model.embedding.embed(future),
                            cache.layer(0, position, self.max_len))  # [B, 1, d]
            h_last = h[:, 0]
            tok, p = self._pick(last_module.out_norm(h_last))
            tokens[self.rows, m + j] = tok
            drafts.append(tok)
            probs.append(p)
        return self._stacked(drafts, probs)


class DeepSeekMTP(MTPObjective, kind="deepseek"):
    options = {"detach_trunk": Option(
        False, "stop MTP gradients at the main model's hidden state (the shared embedding and "
               "head still learn from the MTP losses)")}
    reads_future_tokens = True
    shares_with_main_model = ("model.embed_tokens (future-token embeddings)",
                              "lm_head (shared head)")
    drafter = DeepSeekDrafter

    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__(dcfg, ctx)
        self.detach_trunk = dcfg.mtp.option("detach_trunk")
        self.layers = nn.ModuleList(DeepSeekModule(dcfg, ctx) for _ in range(dcfg.mtp.depth))

    def depth_hiddens(self, x: TailInputs) -> list[tuple[int, torch.Tensor]]:
        h = x.main.detach() if self.detach_trunk else x.main
        out = []
        for k, layer in enumerate(self.layers, start=1):
            h = layer(h, x.shared(x.labels[:, k - 1]), None, x.mask)  # Emb(t_{i+k}) [B, T, d]
            out.append((k, layer.out_norm(h)))
        return out
