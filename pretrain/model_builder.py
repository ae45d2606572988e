"""Builds the trainable module: the whole model (PP = 1, DeepSpeed's ordinary engine) or the same
layers cut into pipeline stages (DeepSpeed PipelineModule), from the factories in model/.

Pipeline layers: [embedding (tied "embed"), block_0 … block_{L-1}, tail, embedding again (tied
"embed", pass-through)]. The second copy of the tied embedding puts the shared embedding and head
on the last stage, where the MTP tail needs them; DeepSpeed all-reduces its gradients with the
first stage's copy. The tail layer only passes the trunk output on: the losses need the labels,
which the pipeline engine hands to `loss_fn` alone, so `TailLoss` runs the tail there.
"""

from __future__ import annotations

import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from model import DecoderConfig, MTPLanguageModel, MTPOutput, ParallelContext, accelerator
from model.attention import DocumentMask, document_mask
from model.cost import layer_costs
from model.tail import OutputTail
from model.tp_regions import check_sequence_parallel_params
from model.transformer import build_block, build_embedding, build_tail
from pretrain.distributed import Topology

# DeepSpeed's LayerSpec builds nn.Module classes; these wrap the model's layer factories (which
# seed each layer, so a stage builds exactly the weights the whole model would hold).


def _touch(x, weight):
    """x + 0·Σweight: the value of x exactly, plus a (zero) gradient path to `weight`.

    DeepSpeed all-reduces each tied weight's gradient between the stages that hold it, but skips a
    rank whose gradient is None, and its peer then waits forever. A tied weight that one stage
    does not use (the untied head on stage 0; the input embedding on the last stage when the
    MTP kind embeds no future tokens) therefore gets this zero gradient there."""
    if weight.requires_grad:
        return x + 0.0 * weight.sum()
    return x


class StageMasks:
    """The document mask of the micro-batch a stage is running, built once for all its layers.

    With document-masked attention the stages pass (hidden, doc_ids) along (DeepSpeed sends
    integer tensors forward and expects no gradient for them); every layer of a stage sees the
    same doc_ids tensor, so the mask is rebuilt only when that tensor changes."""

    def __init__(self):
        self._doc_ids: torch.Tensor | None = None
        self._mask: DocumentMask | None = None

    def get(self, doc_ids: torch.Tensor) -> DocumentMask:
        if doc_ids is not self._doc_ids:
            self._doc_ids = doc_ids
            self._mask = document_mask(doc_ids, accelerator.flex_attention_supported())
        assert self._mask is not None
        return self._mask


def _split(x):
    """A stage's input: the hidden states, or (hidden states, doc_ids) with document masks."""
    return x if isinstance(x, tuple) else (x, None)


class PipelineEmbedding(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext, seed: int):
        super().__init__()
        self.embedding = build_embedding(dcfg, ctx, seed)

    def forward(self, inputs):
        input_ids, doc_ids = _split(inputs)
        h = self.embedding(input_ids)
        if self.embedding.head_weight is not None:  # used on the last stage only
            h = _touch(h, self.embedding.head_weight)
        return h if doc_ids is None else (h, doc_ids)


class PipelineBlock(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext, index: int, seed: int,
                 masks: StageMasks):
        super().__init__()
        self.block = build_block(dcfg, ctx, index, seed)
        self.masks = masks

    def forward(self, inputs):
        hidden, doc_ids = _split(inputs)
        if doc_ids is None:
            return self.block(hidden)
        return self.block(hidden, None, self.masks.get(doc_ids)), doc_ids


class PipelineTail(nn.Module):
    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext, seed: int):
        super().__init__()
        self.tail: OutputTail = build_tail(dcfg, ctx, seed)

    def forward(self, hidden):
        return hidden


def _pass_through(_module, x):
    return x


class TailLoss:
    """`loss_fn` of the pipeline: runs the output tail on the last stage with the labels.

    Its step runner (pretrain/step_runner.py) sets `mtp_weight` and `step` before each optimizer
    step and collects `outputs` (one `MTPOutput` per micro-batch) after it.
    """

    def __init__(self, masks: StageMasks):
        self.tail: OutputTail | None = None
        self.shared = None
        self.masks = masks
        self.mtp_weight = 0.0
        self.step = 0
        self.outputs: list[MTPOutput] = []

    def bind(self, pipe: PipelineModule) -> None:
        tails = [f for f in pipe.forward_funcs if isinstance(f, PipelineTail)]
        if tails:  # only the last stage has the tail
            self.tail = tails[0].tail
            self.shared = pipe.tied_modules["embed"].embedding

    def __call__(self, inputs, targets):
        assert self.tail is not None, "loss_fn called on a stage without the tail"
        hidden, doc_ids = _split(inputs)
        labels, loss_mask = targets
        mask = None if doc_ids is None else self.masks.get(doc_ids)
        out = self.tail(hidden, labels, loss_mask, self.shared, self.mtp_weight, self.step, mask)
        self.outputs.append(out)
        objective = self.tail.objective
        if objective is None or not objective.reads_future_tokens:
            if self.shared.head_weight is not None:  # the input embedding is unused here
                return _touch(out.loss, self.shared.word_embeddings.weight)
        return out.loss


def stage_parts(dcfg: DecoderConfig, seq_len: int, num_stages: int, method: str) -> list[int]:
    """Layer boundaries of the stages. Units are [embedding, each block, tail + tied copy]; the
    embedding always starts stage 0 and the tail group always ends the last stage. 'compute'
    balances forward FLOPs (model/cost.py: the tail runs the head once per depth), 'parameters'
    the weights each unit holds (the tail unit also holds the tied embedding's copy)."""
    costs = layer_costs(dcfg, seq_len)
    if method == "uniform":
        weights = [1] * len(costs)
    elif method == "compute":
        weights = [c.flops for c in costs]
    else:
        assert method == "parameters", method
        weights = [c.params for c in costs]
        weights[-1] += costs[0].params
    unit_parts = ds_utils.partition_balanced(weights=weights, num_parts=num_stages)
    # unit index → layer index: units 0..L map 1:1, the last unit (tail group) spans 2 layers.
    n = dcfg.model.num_layers
    return [p if p <= n + 1 else p + 1 for p in unit_parts]


class MTPPipelineModule(PipelineModule):
    def __init__(self, *args, stage_parts: list[int], **kwargs):
        self._stage_parts = stage_parts
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._stage_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_whole_model(dcfg: DecoderConfig, ctx: ParallelContext, seed: int) -> MTPLanguageModel:
    return MTPLanguageModel(dcfg, ctx, seed)


def build_pipeline(dcfg: DecoderConfig, ctx: ParallelContext, seed: int, topo: Topology,
                   partition_method: str, seq_len: int) -> tuple[MTPPipelineModule, TailLoss]:
    dcfg.validate(ctx.tp_size)
    tied = ["embedding.word_embeddings.weight"] + (
        [] if dcfg.model.tie_embeddings else ["embedding.head_weight"])
    specs = [TiedLayerSpec("embed", PipelineEmbedding, dcfg, ctx, seed, tied_weight_attr=tied)]
    masks = StageMasks()
    specs += [LayerSpec(PipelineBlock, dcfg, ctx, i, seed, masks)
              for i in range(dcfg.model.num_layers)]
    specs += [LayerSpec(PipelineTail, dcfg, ctx, seed),
              TiedLayerSpec("embed", PipelineEmbedding, dcfg, ctx, seed, forward_fn=_pass_through,
                            tied_weight_attr=tied)]
    loss = TailLoss(masks)
    pipe = MTPPipelineModule(
        layers=specs, loss_fn=loss, topology=topo.ds_topology,
        stage_parts=stage_parts(dcfg, seq_len, topo.layout.pp, partition_method),
        activation_checkpoint_interval=0)
    loss.bind(pipe)
    if ctx.sp_group is not None:
        check_sequence_parallel_params(pipe)
    return pipe, loss


def full_parameter_names(module: nn.Module) -> tuple[dict[str, nn.Parameter], set[str]]:
    """(full name → parameter, as MTPLanguageModel names them) of a model or a pipeline stage,
    and the names whose parameter here is a second copy (the tied embedding on the last stage
    of a pipeline that also has it on the first: its state is the first stage's to save)."""
    if not isinstance(module, PipelineModule):
        return dict(module.named_parameters()), set()
    out = {}
    for name, p in module.named_parameters():
        head, _, rest = name.partition(".")
        if head == "tied_modules":  # tied_modules.embed.embedding.…
            out[rest.partition(".")[2]] = p
        elif rest.startswith("block."):  # LAYER.block.…: the trunk block LAYER - 1
            out[f"blocks.{int(head) - 1}.{rest[len('block.'):]}"] = p
        else:
            assert rest.startswith("tail."), name
            out[rest] = p
    copies = set()
    if module.stage_id > 0:  # the first stage holds the tied embedding's saved copy
        copies = {n for n in out if n.startswith("embedding.")}
    return out, copies
