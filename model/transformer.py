"""The decoder as an ordered list of layers: shared embedding, blocks, output tail.

`MTPLanguageModel` runs the list whole (single process, TP, or DeepSpeed's ordinary engine); the
training job cuts the same layers into pipeline stages, with the shared embedding tied between the
first stage (input) and the last (MTP embeddings and head). Each layer's factory lives here so both
paths build identical modules.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from model.attention import DocumentMask, document_mask
from model.block import TransformerBlock
from model.config import DecoderConfig
from model.embedding import SharedEmbedding
from model.parallel import ParallelContext, meta_context
from model.tail import TAIL_PREFIX, MTPOutput, OutputTail
from model.tp_regions import check_sequence_parallel_params, gather_sequence


def _frozen(module: nn.Module, frozen: bool) -> nn.Module:
    if frozen:
        module.requires_grad_(False)
    return module


@contextlib.contextmanager
def _layer_rng(seed: int, layer_index: int):
    """Each layer initialises from its own seed, so a layer's weights do not depend on which
    other layers this process builds: pipeline stages, TP ranks and the whole model agree."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + layer_index)
        yield


def build_embedding(dcfg: DecoderConfig, ctx: ParallelContext, seed: int = 0) -> SharedEmbedding:
    with _layer_rng(seed, 0):
        return _frozen(SharedEmbedding(dcfg.model, ctx), dcfg.mtp.freezes_trunk)


def build_block(dcfg: DecoderConfig, ctx: ParallelContext, index: int, seed: int = 0) -> TransformerBlock:
    cfg = dcfg.model
    recompute = cfg.recompute
    if recompute == "full" and cfg.recompute_num_layers is not None \
            and index >= cfg.recompute_num_layers:
        recompute = "none"
    with _layer_rng(seed, 1 + index):
        return _frozen(TransformerBlock(cfg, ctx, recompute=recompute), dcfg.mtp.freezes_trunk)


def build_tail(dcfg: DecoderConfig, ctx: ParallelContext, seed: int = 0) -> OutputTail:
    with _layer_rng(seed, 1 + dcfg.model.num_layers):
        tail = OutputTail(dcfg, ctx)
    _frozen(tail.final_norm, dcfg.mtp.freezes_trunk)
    return tail


class MTPLanguageModel(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext, seed: int = 0):
        super().__init__()
        dcfg.validate(ctx.tp_size)
        self.config = dcfg
        self.embedding = build_embedding(dcfg, ctx, seed)
        self.blocks = nn.ModuleList(
            build_block(dcfg, ctx, i, seed) for i in range(dcfg.model.num_layers))
        self.tail = build_tail(dcfg, ctx, seed)
        if ctx.sp_group is not None:
            check_sequence_parallel_params(self)

    def layers(self) -> list[nn.Module]:
        """The ordered layers: [embedding, block_0 … block_{L-1}, tail]."""
        return [self.embedding, *self.blocks, self.tail]

    def trunk(self, input_ids: torch.Tensor, mask: DocumentMask | None = None) -> torch.Tensor:
        """input_ids [B, T] → last block's output [B, T, d] (before the final norm)."""
        h = self.embedding(input_ids)
        for block in self.blocks:
            h = block(h, None, mask)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        mtp_weight: float = 0.0,
        step: int = 0,
        doc_ids: torch.Tensor | None = None,
    ) -> MTPOutput:
        """input_ids [B, T], labels [B, D+1, T], loss_mask [B, D+1, T]; `mtp_weight` is λ for this
        step; `step` seeds the per-step choices of the objective (blockwise sampling);
        `doc_ids` [B, T] (data_pipeline.document_ids): attention stays within documents."""
        mask = None
        if doc_ids is not None:
            # Imported here: `import model` must not import DeepSpeed (whose import announces
            # the accelerator it picked before a command can quiet it).
            from model import accelerator

            mask = document_mask(doc_ids, accelerator.flex_attention_supported())
        return self.tail(self.trunk(input_ids, mask), labels, loss_mask, self.embedding,
                         mtp_weight, step, mask)

    @torch.no_grad()
    def main_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the main model alone, [B, T, V] gathered over TP (and over the
        sequence under sequence parallelism)."""
        hidden = self.tail.final_norm(self.trunk(input_ids))
        return self.embedding.logits(gather_sequence(hidden, self.tail.sp_group))

    def main_model_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters of the main model only (the MTP objective dropped)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TAIL_PREFIX)}


def meta_parameters(dcfg: DecoderConfig) -> dict[str, nn.Parameter]:
    """The parameters of the TP = 1 model on the meta device (no memory, no init): the source
    of truth for parameter names, shapes and TP split layouts (`model.sharding.tp_layout`)."""
    with torch.device("meta"):
        model = MTPLanguageModel(dcfg, meta_context())
    return dict(model.named_parameters())
