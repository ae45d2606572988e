"""The one typed config tree of a training run (YAML under configs/, CLI overrides on top).

`load_config(path, overrides)` → validated `RunConfig`; the DeepSpeed JSON is generated from it
(`pretrain.deepspeed_config`) and the resolved tree is written into the run directory and into
every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from data_pipeline.mixture import DataSource
from data_pipeline.remote import RemoteOptions
from model.config import DecoderConfig, ModelConfig, MTPConfig, require_positive
from model.mtp.objective import NO_MTP
from pretrain.config_loader import ConfigError, apply_override, from_dict, load_yaml


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core layers); must divide heads, KV heads, vocab, FFN."""
    pp: int = 1
    """Pipeline stages (DeepSpeed PipelineEngine); the MTP tail runs on the last stage."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage over the data-parallel ranks: 1–3 without PP, 1 with PP. (ZeRO's
    optimizers are what skip a step with non-finite gradients, so stage 0 is not offered.)"""
    partition_method: Literal["compute", "parameters", "uniform"] = "compute"
    """How layers are balanced over pipeline stages: by forward FLOPs (the head and MTP tail
    included), by the parameters each holds, or by count."""
    overlap_comm: bool | Literal["auto"] = "auto"
    """Reduce gradients in buckets during the backward pass (DeepSpeed overlap_comm with
    contiguous gradient buckets). 'auto': on with GPUs when the data-parallel size is > 1; with
    one replica there is nothing to reduce, and the per-parameter bucketing only costs host time
    (110m benchmark, one GPU: off is 1.5-2 % faster and peaks 0.8 GiB higher)."""

    sequence_parallel: bool = False
    """With TP > 1: split the activations between the TP matmuls (norms, residual stream, the
    MTP tail's elementwise work) along the sequence over the TP ranks (Megatron's sequence
    parallelism): their memory divides by TP for the same communication volume. The sequence
    length must be divisible by parallel.tp."""
    sequence_parallel_regather: bool = False
    """With sequence parallelism, compiled: gather the column-parallel layers' inputs again in
    the backward, as eager runs do, instead of keeping them gathered from the forward (where the
    compiler otherwise moves that gather): d values a token less per block (~2 GiB at the 8B
    shape, micro-batch 1) for two more all-gathers a block in the backward. No effect under
    full recomputation (a recomputed block keeps its input only) or without torch.compile."""

    def validate(self) -> None:
        require_positive("parallel.tp", self.tp)
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel = true with parallel.tp = 1: sequence "
                             "parallelism splits activations over the tensor-parallel ranks; "
                             "set parallel.tp > 1 or parallel.sequence_parallel = false")
        if self.sequence_parallel_regather and not self.sequence_parallel:
            raise ValueError("parallel.sequence_parallel_regather = true without sequence "
                             "parallelism: it changes how sequence-parallel layers keep their "
                             "inputs; set parallel.sequence_parallel = true (with tp > 1) or "
                             "drop it")
        require_positive("parallel.pp", self.pp)
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage = {self.zero_stage}; use 1, 2 or 3")
        if self.pp > 1 and self.zero_stage > 1:
            raise ValueError(
                f"parallel.zero_stage = {self.zero_stage} with parallel.pp = {self.pp}: "
                "DeepSpeed's pipeline engine supports ZeRO stage 1 only; set "
                "parallel.zero_stage=1")


@dataclass
class MTPWeightConfig:
    """λ, the weight of the MTP losses, as a step function of consumed training tokens."""

    values: list[float] = field(default_factory=lambda: [0.3])
    """λ for each phase (DeepSeek-V3: [0.3, 0.1])."""
    boundaries_tokens: list[int] = field(default_factory=list)
    """Token counts at which the next value starts; one fewer than `values`, increasing."""

    def validate(self) -> None:
        if not self.values:
            raise ValueError("mtp_weight.values is empty; give at least one λ (e.g. [0.3])")
        if any(v < 0 for v in self.values):
            raise ValueError(f"mtp_weight.values = {self.values} must be >= 0")
        b = self.boundaries_tokens
        if len(b) != len(self.values) - 1:
            raise ValueError(
                f"mtp_weight.boundaries_tokens has {len(b)} entries for {len(self.values)} "
                "values; it needs exactly one fewer (the switch points)")
        if any(y <= x for x, y in zip(b, b[1:])) or any(x <= 0 for x in b):
            raise ValueError(
                f"mtp_weight.boundaries_tokens = {b} must be positive and increasing")


@dataclass
class SourceConfig:
    """One dataset of a training mixture."""

    path: str = ""
    """Dataset directory written by `mtp prepare` (or its manifest.json)."""
    weight: float = 1.0
    """Sampling weight; the mixture draws each source in proportion to its weight, sample by
    sample (only ratios matter)."""
    name: str = ""
    """Name in metrics (data/tokens/NAME, val/NAME/...) and messages; default: the dataset
    directory's name."""


@dataclass
class RemoteConfig:
    """Reading datasets at http(s)://, s3:// or pipe: locations (data_pipeline/remote.py)."""

    retries: int = 5
    """Retries per file after a transient failure (dropped connection, timeout, HTTP 5xx, a
    command exiting non-zero), each resuming at the byte reached; every one is logged."""
    backoff_s: float = 1.0
    """Wait before the first retry, doubled for each further one (at most 30 s)."""
    stall_timeout_s: int = 60
    """An HTTP transfer that delivers nothing for this long is abandoned and retried."""
    cache_dir: str = ""
    """Keep verified remote shards here (named by sha256) and read them locally next time;
    empty: no cache. Shared by all ranks of a node."""
    s3_command: str = "aws s3 cp {url} -"
    """Command printing an s3:// object to stdout ({url}, {bucket}, {key} are filled in), e.g.
    'aws s3 cp --endpoint-url https://minio:9000 {url} -' or 's5cmd cat {url}'."""

    def validate(self) -> None:
        require_positive("data.remote.retries", self.retries, allow_zero=True)
        require_positive("data.remote.backoff_s", self.backoff_s, allow_zero=True)
        require_positive("data.remote.stall_timeout_s", self.stall_timeout_s)
        if "{url}" not in self.s3_command and "{key}" not in self.s3_command:
            raise ValueError(f"data.remote.s3_command = {self.s3_command!r} names no object; "
                             "include {url} (or {bucket} and {key})")

    def options(self) -> RemoteOptions:
        return RemoteOptions(retries=self.retries, backoff_s=self.backoff_s,
                             stall_timeout_s=self.stall_timeout_s,
                             cache_dir=self.cache_dir or None, s3_command=self.s3_command)


@dataclass
class DataConfig:
    path: str = ""
    """Dataset directory written by `mtp prepare` (holds manifest.json), or where it is
    published: http(s)://HOST/DIR/, s3://BUCKET/DIR/, or pipe:COMMAND printing the file {name}
    (shards are streamed, never downloaded whole); or use `sources`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of `path`: [{path, weight, name}, ...]. The sources must share
    the tokenizer and seq_len; each has its own epochs; validation loss is logged per source."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    mask_cross_document: bool | Literal["attention"] = True
    """true: do not train MTP depths on targets that lie in a later document than the input
    token (labels only; attention still spans the packed window). 'attention': that, and every
    token attends only within its own document of the packed window (the trunk's and the MTP
    modules' blocks; FlexAttention block masks on GPUs, a dense SDPA mask on the CPU). false:
    neither."""
    skip_corrupt: bool = False
    """Skip (and count) corrupt shards instead of stopping with an error that names them."""
    verify_checksums: bool = True
    """Check every local training shard's sha256 against the manifest at start-up (reads the
    split once per data-reading rank); a mismatch is an error naming the shard, or a counted
    skip with skip_corrupt. Without it a shard altered in place (same size, readable) trains
    silently. Remote shards are always checked, as they stream."""
    shuffle_buffer: int = 8192
    """Samples shuffled together within the seeded epoch order."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def validate(self) -> None:
        if self.path and self.sources:
            raise ValueError(
                f"data.path = {self.path!r} and data.sources = [{len(self.sources)} sources] are "
                "both set; use data.path for one dataset or data.sources for a mixture")
        if not self.path and not self.sources:
            raise ValueError(
                "data.path is empty; point it at a dataset built by `mtp prepare` "
                "(e.g. data.path=data/stdlib), or list a mixture in data.sources")
        for i, src in enumerate(self.sources):
            if not src.path:
                raise ValueError(f"data.sources[{i}].path is empty; give the source's dataset "
                                 "directory")
            if not src.weight > 0:
                raise ValueError(f"data.sources[{i}].weight = {src.weight}; use a positive "
                                 "number (only the ratios between sources matter)")
        names = [s.label for s in self.source_list()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.sources: the name(s) {dupes} are used by several sources; "
                             "give each one its own data.sources[i].name")
        require_positive("data.num_workers", self.num_workers, allow_zero=True)
        require_positive("data.shuffle_buffer", self.shuffle_buffer)
        self.remote.validate()

    def source_list(self) -> list[DataSource]:
        """The datasets to read: `path` as one source, or the mixture."""
        if self.path:
            return [DataSource(self.path)]
        return [DataSource(s.path, s.weight, s.name) for s in self.sources]

    @property
    def is_mixture(self) -> bool:
        return len(self.sources) > 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 over this many optimizer steps."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """'cosine': after the warmup, a cosine decay to min_lr at train.steps (lengthening
    train.steps on resume stretches the whole remaining curve: the learning rate jumps up to
    where the longer cosine stands). 'wsd' (warmup-stable-decay): lr held after the warmup, then
    a linear decay to min_lr over the last decay_steps (or decay_fraction of train.steps) —
    a run can be extended from any checkpoint of its stable phase, or annealed by setting
    train.steps to that step plus the decay."""
    decay_steps: int | None = None
    """wsd: steps of the final decay (null: decay_fraction of train.steps)."""
    decay_fraction: float = 0.1
    """wsd: the final decay's share of train.steps when decay_steps is null."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables. Set explicitly (DeepSpeed's own default is 1.0)."""

    def validate(self) -> None:
        require_positive("optim.lr", self.lr)
        require_positive("optim.min_lr", self.min_lr, allow_zero=True)
        require_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        require_positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr = {self.min_lr} exceeds optim.lr = {self.lr}; "
                             "lower optim.min_lr")
        if self.decay_steps is not None:
            require_positive("optim.decay_steps", self.decay_steps)
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction = {self.decay_fraction} must be in (0, 1]; "
                             "e.g. 0.1 for a decay over the last tenth of the steps")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train (the cosine decay ends here)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 64
    """Sequences per optimizer step = micro_batch_size × data-parallel size × accumulation."""
    seed: int = 1234
    """Seeds weight init (per layer) and the data order."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto': bf16 on GPUs, fp32 on CPU."""
    grad_accum_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """With bf16: the dtype gradients are accumulated in across micro-batches (and reduced in):
    'fp32' keeps every micro-batch's contribution exactly (DeepSpeed data_types.grad_accum_dtype;
    with ZeRO-1 it switches to DeepSpeed's BF16 optimizer) at 2 more bytes per parameter for the
    gradients; 'auto' is 'bf16' (see benchmarks/RESULTS.md for the A/B). With fp32 precision
    everything is fp32."""
    init_from: str | None = None
    """Start the main model (embedding, blocks, final norm; not the MTP tail, which is freshly
    initialised) from this export, checkpoint/run directory, or Hugging Face Llama checkpoint
    directory (config.json + model.safetensors, as transformers saves it) instead of a random
    init: continued pretraining of a published model with MTP, or blockwise heads on a frozen
    pretrained trunk (mtp.freeze_trunk). The model section must describe the same shape (an
    error lists what differs); PP = 1 only. A resumed run takes every weight from its
    checkpoint."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the transformer blocks and the fused loss kernels. 'auto': on with GPUs and
    ZeRO <= 2, off on CPU (compiling costs ~30 s per block shape there and gains little).
    ZeRO-3 gathers parameters in module hooks that compiled code would bypass: true is refused."""
    nonfinite: Literal["skip", "stop"] = "stop"
    """On a non-finite loss or gradient: skip the step (weights unchanged) or stop the run."""
    max_skipped_steps: int = 20
    """With nonfinite 'skip': stop after this many consecutive skipped steps."""
    log_interval: int = 10
    """Steps between console/TensorBoard log lines."""
    eval_interval: int = 200
    """Steps between validation passes (0 disables)."""
    eval_batches: int = 10
    """Micro-batches per validation pass (per data-parallel rank)."""
    eval_acceptance_prompts: int = 0
    """With validation: also decode this many held-out prompts per data-parallel rank with greedy
    self-speculative decoding and log the real draft acceptance per depth (0: off; PP = 1 and
    ZeRO ≤ 2 only, where every rank holds the whole, unpartitioned model)."""
    eval_acceptance_tokens: int = 32
    """New tokens decoded per acceptance prompt."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device for MFU; 0 = known cards (H100/H200/A100) by name."""
    collective_timeout_s: int = 600
    """Timeout of collectives: a dead peer makes the others fail after this, not hang."""
    memory_snapshot_steps: int = 0
    """Record the GPU allocator's history (every allocation and free, with the stack that made
    it) from start-up through this many steps, and write it to RUN_DIR/memory/rankNNNNN.pickle
    (open it at https://pytorch.org/memory_viz): where the peak falls and what holds it. Also
    written when a step in that window runs out of memory. 0: off. GPUs only; recording slows
    the host side of those steps."""

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval",
                     "collective_timeout_s"):
            require_positive(f"train.{name}", getattr(self, name))
        for name in ("eval_interval", "eval_batches", "max_skipped_steps",
                     "eval_acceptance_prompts", "eval_acceptance_tokens",
                     "memory_snapshot_steps"):
            require_positive(f"train.{name}", getattr(self, name), allow_zero=True)


@dataclass
class CheckpointConfig:
    interval: int = 500
    """Save every this many steps (0: only at exit)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one completes."""
    save_at_exit: bool = True
    """Save when training ends or is interrupted (SIGTERM/SIGUSR1 checkpoint and exit)."""
    async_save: bool | Literal["auto"] = "auto"
    """Write interval checkpoints in the background: the step waits only for the state to be
    copied to host memory, a second save waits for the first, and COMPLETE.json is written once
    every rank's files are on disk. The host buffers (the size of the rank's masters and
    moments, e.g. 47 GiB per rank for 8B at TP 2) are allocated as training starts and kept. 'auto':
    on GPUs (where a save of a large model would stall every rank for its whole write), off on
    the CPU. The checkpoint at exit or on a signal is always written before the process ends."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A save that fails (disk full, write error): 'stop' the run (exit 4), or 'continue'
    training after logging the error and removing the partial directory. Either way the previous
    complete checkpoint stays the one that resume picks."""

    def validate(self) -> None:
        require_positive("checkpoint.interval", self.interval, allow_zero=True)
        require_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Directory for checkpoints, TensorBoard events and the resolved config."""
    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    mtp_weight: MTPWeightConfig = field(default_factory=MTPWeightConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def decoder(self) -> DecoderConfig:
        return DecoderConfig(self.model, self.mtp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Every check that needs no world size (those are in `validate_layout`): each section's
        own, then those across sections. Raises ConfigError naming the key and the fix."""
        try:
            self.decoder.validate(self.parallel.tp)
            for section in (self.mtp_weight, self.parallel, self.data, self.optim, self.train,
                            self.checkpoint):
                section.validate()
            self._validate_across_sections()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _validate_across_sections(self) -> None:
        p, t = self.parallel, self.train
        if p.pp > self.model.num_layers + 2:
            raise ValueError(
                f"parallel.pp = {p.pp} exceeds the {self.model.num_layers + 2} pipeline layers "
                "(embedding, blocks, tail); use fewer stages")
        if t.init_from is not None and p.pp > 1:
            raise ValueError(f"train.init_from = {t.init_from!r} with parallel.pp = {p.pp}: "
                             "initialising from a model is supported with pp = 1 only")
        if t.compile is True and p.zero_stage == 3:
            raise ValueError("train.compile = true with parallel.zero_stage = 3: ZeRO-3 gathers "
                             "parameters in module hooks that compiled blocks bypass; use "
                             "zero_stage 1 or 2, or train.compile=false")
        if t.eval_acceptance_prompts:
            if self.mtp.kind == NO_MTP:
                raise ValueError("train.eval_acceptance_prompts needs an MTP objective (mtp.kind "
                                 "is 'none'); set it to 0")
            if p.pp > 1 or p.zero_stage == 3:
                raise ValueError(
                    "train.eval_acceptance_prompts works with parallel.pp = 1 and zero_stage <= "
                    "2 (decoding needs the whole, unpartitioned model on each rank); set it to 0 "
                    "and run `mtp eval` on a checkpoint instead")
            room = self.model.max_seq_len - t.eval_acceptance_tokens - 2 * self.mtp.depth - 2
            if room < 1:
                raise ValueError(
                    f"train.eval_acceptance_tokens = {t.eval_acceptance_tokens} leaves no room "
                    f"for a prompt within model.max_seq_len = {self.model.max_seq_len}; lower it")


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int
    grad_accum: int


def validate_layout(cfg: RunConfig, world_size: int) -> Layout:
    """TP × PP × DP must equal the world and the batch sizes must divide; refuse otherwise."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp):
        raise ConfigError(
            f"parallel.tp × parallel.pp = {tp} × {pp} = {tp * pp} does not divide the world size "
            f"{world_size}; choose sizes whose product divides the number of processes")
    dp = world_size // (tp * pp)
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp} = {per_step}; "
            f"use e.g. train.global_batch_size={per_step * max(1, t.global_batch_size // per_step)}")
    return Layout(world_size, tp, pp, dp, t.global_batch_size // per_step)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)


def config_from_dict(data: dict) -> RunConfig:
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg
