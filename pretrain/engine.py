"""Builds what a training step runs on: the model (whole, or cut into pipeline stages), its
optimizer, the DeepSpeed engine, and the step runner for that kind of engine."""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
from torch import nn

from model import MTPLanguageModel, ParallelContext
from model.compile import compile_for_training, use_loss_kernels
from model.config import ModelConfig
from model.sharding import load_full_state_dict
from model.tail import TAIL_PREFIX
from pretrain.config import ConfigError, Layout, RunConfig
from pretrain.deepspeed_config import deepspeed_config
from pretrain.distributed import MegatronMPU, Topology
from pretrain.model_builder import build_pipeline
from pretrain.runtime import RuntimePolicy
from pretrain.step_runner import PipelineRunner, StepRunner, WholeModelRunner
from pretrain.zero_overflow import use_fused_overflow_check


@dataclass
class TrainingEngine:
    engine: deepspeed.DeepSpeedEngine
    runner: StepRunner
    init_source: str | None
    """Where train.init_from took the main model's weights from (None: random init)."""
    fused_overflow_check: bool
    """ZeRO's inf/NaN check runs as one fused kernel (pretrain/zero_overflow.py)."""

    @property
    def module(self) -> nn.Module:
        return self.engine.module


OPTIMIZER_GROUP_ELEMENTS = 100_000_000
"""Most parameters in one optimizer group. DeepSpeed's ZeRO-1/2 step copies one group's gradient
partition to a flat buffer and then to fp32 at a time: with all matrices in one group that
transient is 6 bytes per local parameter (24 GB for the 4B-parameter shard of the 8B shape at
TP 2, on top of weights, gradients and optimizer states); in groups of 1e8 it is 0.6 GB. The
update itself is unchanged."""


def param_groups(module: nn.Module, weight_decay: float,
                 max_elements: int = OPTIMIZER_GROUP_ELEMENTS) -> list[dict]:
    """Weight decay on matrices only (not on norm gains); matrices in groups of at most
    `max_elements` (a larger single matrix gets a group of its own)."""
    decay: list[list] = [[]]
    no_decay = []
    size = 0
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            no_decay.append(p)
            continue
        if decay[-1] and size + p.numel() > max_elements:
            decay.append([])
            size = 0
        decay[-1].append(p)
        size += p.numel()
    return [*({"params": g, "weight_decay": weight_decay} for g in decay if g),
            {"params": no_decay, "weight_decay": 0.0}]


# The model fields that decide the main model's weights and outputs (not max_seq_len: RoPE is
# computed for any position; not the loss settings, which are training-only).
_INIT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size",
                "tie_embeddings", "rope_theta", "norm_eps")
_CONFIG_KEY = {"kv_heads": "num_kv_heads", "ffn_size": "ffn_hidden_size"}


def init_differences(run: ModelConfig, source: ModelConfig) -> list[tuple[str, object, object]]:
    """(config key, run value, source value) for every field where the run's model section
    cannot take the source model's weights as they are."""
    return [(f"model.{_CONFIG_KEY.get(f, f)}", getattr(run, f), getattr(source, f))
            for f in _INIT_FIELDS if getattr(run, f) != getattr(source, f)]


def _init_main_model(module: nn.Module, ctx: ParallelContext, path: str,
                     run_model: ModelConfig) -> str:
    """train.init_from: the main model's weights from an export, a training checkpoint or a
    Hugging Face Llama checkpoint directory (config.json + safetensors); the MTP modules keep
    their fresh initialisation."""
    from pretrain.export.loading import read_full_state_dict

    try:
        dcfg, full, _, _, source = read_full_state_dict(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.init_from = {path!r}: {err}") from None
    diffs = init_differences(run_model, dcfg.model)
    if diffs:
        raise ConfigError(
            f"train.init_from = {path!r}: the run's model section differs from that model: "
            + "; ".join(f"{k} = {run!r}, the model has {theirs!r}" for k, run, theirs in diffs)
            + "; set " + " ".join(f"{k}={theirs}" for k, _, theirs in diffs))
    try:
        load_full_state_dict(module, full, ctx.tp_group, prefix_excluded=TAIL_PREFIX)
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.init_from = {path!r}: {err}") from None
    return source


def build_engine(cfg: RunConfig, layout: Layout, topo: Topology, policy: RuntimePolicy,
                 device: torch.device, seq_len: int, eos_id: int | None = None) -> TrainingEngine:
    """`eos_id`: the dataset's end-of-document token, for document-masked attention."""
    dcfg = cfg.decoder
    ctx = ParallelContext(topo.tp_group, params_dtype=torch.float32,
                          sequence_parallel=cfg.parallel.sequence_parallel,
                          sequence_parallel_regather=cfg.parallel.sequence_parallel_regather)
    if layout.pp == 1:
        module, loss_fn, mpu = MTPLanguageModel(dcfg, ctx, cfg.train.seed), None, MegatronMPU(topo)
    else:
        module, loss_fn = build_pipeline(dcfg, ctx, cfg.train.seed, topo,
                                         cfg.parallel.partition_method, seq_len)
        mpu = None  # the pipeline engine takes its groups from the topology
    source = None
    if cfg.train.init_from is not None:  # a resume later overwrites every weight
        source = _init_main_model(module, ctx, cfg.train.init_from, cfg.model)
    use_loss_kernels(module, policy.loss_kernels)
    if policy.compile:
        compile_for_training(module)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr,
                                  betas=(o.beta1, o.beta2), eps=o.eps, fused=policy.fused_adam)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=deepspeed_config(cfg, layout, policy), mpu=mpu)
    eos = eos_id if cfg.data.mask_cross_document == "attention" else None
    runner = (WholeModelRunner(engine, device, layout.grad_accum, eos) if loss_fn is None
              else PipelineRunner(engine, device, layout.grad_accum, loss_fn, eos))
    return TrainingEngine(engine, runner, source, use_fused_overflow_check(engine.optimizer))
