"""Per-GPU memory of a run, estimated before launch (`mtp plan`, and a warning from `mtp train`).

What one rank holds, for the pipeline stage that holds the most:

* parameters: the compute-dtype weights of the stage's layers, split over TP (ZeRO-3 also over DP);
* gradients: as DeepSpeed keeps them — the full local set with ZeRO-1 (plus an fp32 copy with
  train.grad_accum_dtype fp32, DeepSpeed's BF16 optimizer), a DP partition with ZeRO-2/3;
* optimizer: fp32 master weights and Adam's two moments, partitioned over DP (ZeRO ≥ 1);
* activations: what the backward needs, per micro-batch and block (itemised in `block_activation`
  for each recompute mode, compiled or eager), times the micro-batches a pipeline stage holds at
  once (1F1B: pp − stage of them), plus the working set of one block's backward;
* the loss: the fused head + cross-entropy keeps the gradient of its input rows and an fp32
  gradient of the head weight from the forward to the backward, and holds one chunk of logits
  (and its fp32 softmax work) at a time;
* buffers: DeepSpeed's gradient-reduction and gather buckets;
* the optimizer step: DeepSpeed turns one parameter group's gradient partition into a flat copy
  and then fp32 while the forward's activations are gone (pretrain/engine.py keeps groups small).

The peak is the states plus the larger of the forward's end (activations + loss) and the step.

Parameter counts come from the model built on the meta device (exact, TP split included);
activations from an itemisation of the tensors autograd saves (tests/test_memory_plan.py checks it
against the tensors really saved on the CPU, and benchmarks/RESULTS.md against GPU peaks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from model.block import TransformerBlock
from model.config import DecoderConfig, ModelConfig
from model.mtp.objective import NO_MTP
from model.transformer import meta_parameters
from pretrain.config import Layout, RunConfig
from pretrain.deepspeed_config import BUCKET_ELEMENTS
from pretrain.engine import OPTIMIZER_GROUP_ELEMENTS
from pretrain.model_builder import stage_parts
from pretrain.runtime import overlaps_reduction

GIB = 2**30


@dataclass
class MemoryPlan:
    stage: int
    """The pipeline stage planned (the one holding the most)."""
    in_flight: int
    """Micro-batches whose activations that stage holds at once."""
    parts: dict[str, float] = field(default_factory=dict)
    """Bytes per component."""
    capacity: float | None = None
    """Bytes of the card the plan is checked against (None: not checked)."""

    @property
    def total(self) -> float:
        """States and buffers, plus the larger of the forward's and the step's working sets."""
        forward = self.parts.get("activations", 0) + self.parts.get("loss", 0)
        rest = sum(v for k, v in self.parts.items()
                   if k not in ("activations", "loss", "optimizer step"))
        return rest + max(forward, self.parts.get("optimizer step", 0))

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def table(self) -> str:
        forward = self.parts.get("activations", 0) + self.parts.get("loss", 0)
        step = self.parts.get("optimizer step", 0)
        lines = []
        for name, value in self.parts.items():
            note = ""
            if name in ("activations", "loss"):
                note = "  (forward)" + ("  <- peak" if forward >= step and name == "loss" else "")
            elif name == "optimizer step":
                note = "  (step)" + ("  <- peak" if step > forward else "")
            lines.append(f"{name:<34} {value / GIB:9.2f} GiB{note}")
        lines.append(f"{'total (pipeline stage ' + str(self.stage) + ')':<34} "
                     f"{self.total / GIB:9.2f} GiB")
        if self.capacity is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict} in {self.capacity / GIB:.1f} GiB "
                         f"({100 * self.total / self.capacity:.0f} %)")
        return "\n".join(lines)


def block_activation(cfg: ModelConfig, mode: str, tp: int, sp: bool, compiled: bool,
                     elem: int, regather: bool = False) -> float:
    """Bytes a block saves for its backward, per token of the micro-batch.

    Per token, with d = width, kv = key/value width, f = SwiGLU width; tensors split over TP are
    /TP; the residual-stream tensors are /TP only under sequence parallelism (rd):
    * compiled, no recompute: the two norms' inputs and outputs (4 rd), the QKV output
      (d + 2kv)/TP, rotated q and k (d + kv)/TP, the attention output d/TP, gate/up 2f/TP and
      the SwiGLU product f/TP; fp32 norm statistics and attention log-sum-exp;
    * selective: the rotated q, k, the attention output and the SwiGLU product are recomputed;
    * full: the block's input alone (the working set of one block comes back in the backward);
    * eager (no torch.compile) also keeps the attention output's transposed copy, each norm's
      normalised value before the gain, and silu(gate);
    * compiled under sequence parallelism (none, selective), the partitioner computes the
      column-parallel layers' re-gather (which does not depend on the gradient) in the forward
      and keeps gathered, whole-sequence inputs: +d a token (measured on the CPU, TP 2:
      tests/test_memory_plan.py; docs/DESIGN.md, "Memory"), unless `regather`
      (parallel.sequence_parallel_regather) keeps that gather in the backward.
    """
    d, kv, f, heads = cfg.hidden_size, cfg.kv_heads * cfg.head_dim, cfg.ffn_size, cfg.num_heads
    rd = d / tp if sp else d
    if mode == "full":
        return elem * rd
    gathered = d if compiled and sp and tp > 1 and not regather else 0
    if mode == "selective":
        n = 4 * rd + (d + 2 * kv) / tp + 2 * f / tp + gathered
        if not compiled:
            n += 3 * d / tp + f / tp
        return elem * n + 4 * 2
    n = 4 * rd + (d + 2 * kv) / tp + (d + kv) / tp + d / tp + 3 * f / tp + gathered
    if not compiled:
        n += d / tp + rd + f / tp
    return elem * n + 4 * (2 + heads / tp)


def _local_params(dcfg: DecoderConfig, tp: int) -> dict[str, float]:
    """Parameters of one TP rank by pipeline unit: 'embedding', 'block', 'tail' (its own)."""
    out = {"embedding": 0.0, "block": 0.0, "tail": 0.0}
    for name, p in meta_parameters(dcfg).items():
        n = p.numel() / tp if getattr(p, "tensor_model_parallel", False) else p.numel()
        unit = ("embedding" if name.startswith("embedding.") else
                "block" if name.startswith("blocks.0.") else
                "tail" if name.startswith("tail.") else None)
        if unit is not None:
            out[unit] += n
    return out


@lru_cache(maxsize=32)
def _objective_saved(model_fields: tuple, kind: str, depth: int, options: tuple) -> tuple:
    """(elements per token the objective saves besides its blocks' own work, its number of
    transformer blocks), at TP = 1. Counted, not itemised: the objective's forward runs on the
    meta device with its blocks fully recomputed (each keeps only its input) under a hook that
    sees every tensor autograd saves — so an objective registered anywhere is planned too. The
    main tail's final norm runs inside the count, as in the model, so that inputs the objective
    shares with it (the trunk's output) are not counted twice; its own share is taken out."""
    from model.config import MTPConfig
    from model.embedding import SharedEmbedding
    from model.mtp.objective import TailInputs, objective_class
    from model.norm import RMSNorm
    from model.parallel import meta_context

    cfg = ModelConfig(**{**dict(model_fields), "recompute": "full",
                         "recompute_num_layers": None})
    dcfg = DecoderConfig(cfg, MTPConfig(kind, depth, dict(options)))
    b, t, d = 1, 8, cfg.hidden_size
    with torch.device("meta"):
        objective = objective_class(kind)(dcfg, meta_context())
        shared = SharedEmbedding(cfg, meta_context())
        norm = RMSNorm(d, cfg.norm_eps)
        trunk = torch.empty(b, t, d, requires_grad=True)
        labels = torch.zeros(b, depth + 1, t, dtype=torch.long)

    def count(with_objective: bool) -> float:
        params = {p.untyped_storage()._cdata for m in (objective, shared, norm)
                  for p in m.parameters()}
        seen: dict[int, int] = {}

        def pack(x):
            storage = x.untyped_storage()
            if storage._cdata not in params:
                seen[storage._cdata] = storage.nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            main = norm(trunk)
            if with_objective:
                objective.depth_hiddens(TailInputs(trunk, main, labels, shared, norm, 0))
        return sum(seen.values()) / 4 / (b * t)  # fp32 elements per token

    blocks = sum(isinstance(m, TransformerBlock) for m in objective.modules())
    return count(True) - count(False), blocks


def _tail_activation(dcfg: DecoderConfig, mode: str, tp: int, sp: bool, compiled: bool,
                     elem: int, tokens: int, regather: bool = False) -> float:
    """The output tail per micro-batch: the final norm, the loss's row gradients, and the MTP
    objective's depths (its blocks as `block_activation`, the rest counted on the meta
    device)."""
    cfg, mtp = dcfg.model, dcfg.mtp
    d = cfg.hidden_size
    rd = d / tp if sp else d
    depths = 0 if mtp.kind == NO_MTP else mtp.depth
    # the final norm's input and (eager) its value before the gain; every depth's row gradient
    per_token = elem * ((1 if compiled else 2) * rd + (depths + 1) * d)
    if depths:
        glue, blocks = _objective_saved(tuple(sorted(asdict(cfg).items())), mtp.kind, mtp.depth,
                                        tuple(sorted(mtp.options.items())))
        # Blocks were counted with full recomputation (their input alone): swap in the mode's.
        per_token += elem * glue / (tp if sp else 1)
        per_token += blocks * (block_activation(cfg, mode, tp, sp, compiled, elem, regather)
                               - block_activation(cfg, "full", tp, sp, compiled, elem))
    return per_token * tokens


SOFTMAX_WORK_BYTES = {"triton": 0, "inductor": 2, "eager": 8}
"""Bytes per logit the loss's softmax work adds to a chunk's logits, by build
(model/loss_kernels.py): Triton writes the gradient over the logits, Inductor into a new
compute-dtype buffer, eager through fp32 temporaries."""


def plan_memory(cfg: RunConfig, layout: Layout, seq_len: int, bf16: bool, compiled: bool,
                capacity_bytes: float | None = None, loss_kernels: str = "eager") -> MemoryPlan:
    """The memory of the rank that holds the most, for `cfg` laid out as `layout`."""
    dcfg, p = cfg.decoder, cfg.parallel
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    sp, regather = p.sequence_parallel, p.sequence_parallel_regather
    elem = 2 if bf16 else 4
    micro, grad_accum = cfg.train.micro_batch_size, layout.grad_accum
    tokens = micro * seq_len  # per-token terms already count a shard under sequence parallelism
    params = _local_params(dcfg, tp)
    parts = stage_parts(dcfg, seq_len, pp, p.partition_method)
    n = dcfg.model.num_layers
    loss_rows = micro * seq_len * (1 + (0 if dcfg.mtp.kind == NO_MTP else dcfg.mtp.depth))

    best = None
    for stage in range(pp):
        lo, hi = parts[stage], parts[stage + 1]  # layer indices: 0 embedding, 1..n blocks, n+1 tail
        n_blocks = sum(1 <= i <= n for i in range(lo, hi))
        first, last = lo == 0, hi >= n + 1
        local = n_blocks * params["block"] + (params["embedding"] if first or last else 0) \
            + (params["tail"] if last else 0)
        in_flight = min(pp - stage, grad_accum) if pp > 1 else 1
        plan = MemoryPlan(stage, in_flight, capacity=capacity_bytes)
        plan.parts.update(_states(local, elem, cfg, dp, bf16))
        act = n_blocks * block_activation(dcfg.model, dcfg.model.recompute, tp, sp, compiled,
                                          elem, regather) * tokens
        if last:
            act += _tail_activation(dcfg, dcfg.model.recompute, tp, sp, compiled, elem, tokens,
                                    regather)
        plan.parts["activations"] = act * in_flight
        if last:
            v_local = dcfg.model.vocab_size / tp
            chunk = min(dcfg.model.loss_chunk_tokens, loss_rows)
            # fp32 head-weight gradient kept for the backward; one chunk's logits and its
            # softmax work; the stacked rows of every depth
            plan.parts["loss"] = (4 * v_local * dcfg.model.hidden_size
                                  + chunk * v_local * (elem + SOFTMAX_WORK_BYTES[loss_kernels])
                                  + loss_rows * dcfg.model.hidden_size * elem)
        # The backward of the last block holds about one block's worth of gradients of its
        # intermediates on top (with full recomputation, its recomputed activations as well;
        # with the re-gather, the gathered inputs it brings back: counted without `regather`).
        working = 2 if dcfg.model.recompute == "full" else 1
        plan.parts["activations"] += working * block_activation(
            dcfg.model, "none", tp, sp, compiled, elem) * tokens
        # ZeRO-1/2 keep two reduction buckets where the reduction overlaps the backward and
        # none otherwise (pretrain/deepspeed_config.py); ZeRO-3 its own two.
        overlap = overlaps_reduction(p, dp, on_gpu=True)
        plan.parts["buffers"] = (2 if p.zero_stage == 3 or overlap else 0) * BUCKET_ELEMENTS * elem
        group = min(OPTIMIZER_GROUP_ELEMENTS, local) / (dp if p.zero_stage > 0 else 1)
        plan.parts["optimizer step"] = group * (elem + 4)
        if best is None or plan.total > best.total:
            best = plan
    assert best is not None
    return best


def _states(local_params: float, elem: int, cfg: RunConfig, dp: int, bf16: bool) -> dict:
    """Weights, gradients and optimizer state of `local_params` parameters under ZeRO."""
    zero = cfg.parallel.zero_stage
    fp32_accum = bf16 and cfg.train.grad_accum_dtype == "fp32"
    weights = local_params * elem / (dp if zero == 3 else 1)
    if zero == 1:
        grads = local_params * elem + (local_params * 4 if fp32_accum else 0)
    else:
        grads = local_params * (4 if fp32_accum else elem) / dp
    # fp32 master weights and Adam's two moments, partitioned over DP; with fp32 weights the
    # master is still a separate copy (DeepSpeed's ZeRO optimizer keeps its own partition).
    optimizer = local_params * 12 / dp
    return {"parameters": weights, "gradients": grads, "optimizer states": optimizer}


def plan_for_run(cfg: RunConfig, layout: Layout, seq_len: int,
                 capacity_bytes: float | None) -> MemoryPlan:
    """The plan of `cfg` as it runs on GPUs: bf16 unless train.precision says fp32, compiled
    unless train.compile is off or ZeRO-3 (the runtime policy's rule, pretrain/runtime.py)."""
    t = cfg.train
    bf16 = t.precision != "fp32"
    compiled = t.compile is True or (t.compile == "auto" and cfg.parallel.zero_stage <= 2)
    kernels = cfg.model.loss_kernels
    if kernels == "auto":
        kernels = "triton" if compiled else "eager"
    return plan_memory(cfg, layout, seq_len, bf16, compiled, capacity_bytes, kernels)
