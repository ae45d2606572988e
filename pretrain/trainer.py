"""The training loop: one DeepSpeed engine (ordinary for PP = 1, pipeline otherwise) over the MTP
model, the streaming loader, schedules, metrics, checkpoints and preemption handling."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger

from data_pipeline import ShardError, ShardLoader, load_manifest
from model import ParallelContext, accelerator
from model.compile import compile_for_training
from model.sharding import load_full_state_dict
from pretrain import checkpoint as ckpt
from pretrain.acceptance_eval import acceptance_metrics
from pretrain.config import ConfigError, RunConfig, validate_layout
from pretrain.deepspeed_config import deepspeed_config
from pretrain.distributed import MegatronMPU, build_topology, detect_launch_env, init_distributed
from pretrain.metrics import MetricsLogger, format_line, forward_flops_per_token, peak_flops
from pretrain.model_builder import build_pipeline, build_whole_model
from pretrain.preemption import EXIT_PREEMPTED, PreemptionFlag
from pretrain.schedules import MTPWeightSchedule, learning_rate
from pretrain.step_metrics import StepStats, gather_to_rank0
from pretrain.zero_overflow import use_fused_overflow_check


class NonFiniteError(RuntimeError):
    pass


EXIT_SAVE_FAILED = 4  # the final checkpoint could not be written (checkpoint.on_save_error=continue)


@dataclass
class TrainResult:
    step: int
    exit_code: int
    losses: list[dict]  # per logged step: the gathered metrics (rank 0; empty elsewhere)
    validation: list[dict] = field(default_factory=list)  # per validation pass (rank 0)


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _compatibility(saved: dict, cfg: RunConfig, layout) -> list[str]:
    """What differs between a checkpoint and this run in ways a resume cannot bridge."""
    now = cfg.to_dict()
    diffs = []
    for section in ("model", "mtp"):
        for key, value in now[section].items():
            old = saved["config"][section].get(key)
            if old != value:
                diffs.append(f"{section}.{key}: checkpoint {old!r}, now {value!r}")
    for key in ("tp", "pp", "zero_stage"):
        old = saved["config"]["parallel"][key]
        if old != now["parallel"][key]:
            diffs.append(f"parallel.{key}: checkpoint {old}, now {now['parallel'][key]}")
    if saved["layout"]["dp"] != layout.dp:
        diffs.append(f"data-parallel size: checkpoint {saved['layout']['dp']}, now {layout.dp} "
                     "(ZeRO optimizer shards are per data-parallel rank)")
    for key in ("micro_batch_size", "global_batch_size", "seed"):
        old = saved["config"]["train"][key]
        if old != now["train"][key]:
            diffs.append(f"train.{key}: checkpoint {old}, now {now['train'][key]}")
    return diffs


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, train_loader=None,
                 preempt: PreemptionFlag | None = None):
        """`train_loader` replaces the ShardLoader of this rank (an iterable of batches with
        state_dict/load_state_dict), e.g. to feed a reference run the batches of several
        data-parallel ranks."""
        self.cfg = cfg
        self.resume = resume
        launch = detect_launch_env()
        init_distributed(launch, cfg.train.collective_timeout_s)
        ds_logger.setLevel(logging.WARNING)
        self.rank = dist.get_rank()
        self.layout = validate_layout(cfg, dist.get_world_size())
        self.topo = build_topology(self.layout, cfg.train.collective_timeout_s)
        self.device = accelerator.current_device()
        on_gpu = not accelerator.is_cpu()
        precision = cfg.train.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and on_gpu)
        if self.bf16 and not on_gpu:
            raise ConfigError("train.precision = 'bf16' needs a GPU; use 'fp32' or 'auto' on CPU")
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.logger = MetricsLogger(self.run_dir, active=self.rank == 0)

        try:
            # With skip_corrupt the loader checks (and skips, counting) the shards itself.
            self.manifest = load_manifest(cfg.data.path, check_files=not cfg.data.skip_corrupt)
        except ShardError:
            raise
        except ValueError as err:  # no/unreadable manifest, tokenizer replaced after the build
            raise ConfigError(f"data.path = {cfg.data.path!r}: {err}") from None
        self._check_data(self.manifest)
        self.seq_len = self.manifest.seq_len
        self.tokens_per_step = cfg.train.global_batch_size * self.seq_len

        dcfg = cfg.decoder
        ctx = ParallelContext(self.topo.tp_group, params_dtype=torch.float32)
        ds_cfg = deepspeed_config(cfg, self.layout, self.bf16, on_gpu)
        if self.layout.pp == 1:
            module = build_whole_model(dcfg, ctx, cfg.train.seed)
            self.tail_loss = None
            mpu = MegatronMPU(self.topo)
        else:
            module, self.tail_loss = build_pipeline(dcfg, ctx, cfg.train.seed, self.topo,
                                                    cfg.parallel.partition_method)
            mpu = None
        if cfg.train.init_from is not None:  # a resume below then overwrites every weight
            self._init_main_model(module, ctx, cfg.train.init_from)
        self.compiled = cfg.train.compile is True or (
            cfg.train.compile == "auto" and on_gpu and cfg.parallel.zero_stage <= 2)
        if self.compiled:
            compile_for_training(module)
        o = cfg.optim
        optimizer = torch.optim.AdamW(_param_groups(module, o.weight_decay), lr=o.lr,
                                      betas=(o.beta1, o.beta2), eps=o.eps, fused=on_gpu)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                    config=ds_cfg, mpu=mpu)
        self.fused_overflow_check = use_fused_overflow_check(self.engine.optimizer)
        self.lam = MTPWeightSchedule(cfg.mtp_weight)
        flops = forward_flops_per_token(dcfg, self.seq_len)
        self.train_flops_per_token = 3 * (flops["main"] + flops["mtp"])
        self.peak = peak_flops(accelerator.device_name(), cfg.train.peak_tflops)

        needs_data = self.topo.is_first_stage or self.topo.is_last_stage
        depth = cfg.mtp.depth
        self.train_loader = ShardLoader(
            cfg.data.path, "train", dp_rank=self.topo.dp_rank, dp_size=self.layout.dp,
            num_workers=cfg.data.num_workers, batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed, depth=depth, mask_cross_document=cfg.data.mask_cross_document,
            skip_corrupt=cfg.data.skip_corrupt, shuffle_buffer=cfg.data.shuffle_buffer,
            pin_memory=on_gpu, verify_checksums=cfg.data.verify_checksums,
        ) if needs_data and train_loader is None else train_loader
        self._reported_corrupt: set[str] = set()
        self._report_skipped_data()
        self.has_val = self.manifest.num_samples("val") > 0 and cfg.train.eval_interval > 0

        self.step = 0
        self.consumed_tokens = 0
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self.save_failures = 0
        self.preempt = preempt if preempt is not None else PreemptionFlag().install()
        self._maybe_resume()  # an incompatible checkpoint is refused before any work
        n_params = sum(p.numel() for p in module.parameters())
        self.logger.print(
            f"mtp train: world {self.layout.world} = TP {self.layout.tp} × PP {self.layout.pp} × "
            f"DP {self.layout.dp}, ZeRO {cfg.parallel.zero_stage}, grad accumulation "
            f"{self.layout.grad_accum}, {'bf16' if self.bf16 else 'fp32'} on "
            f"{accelerator.device_name()}; {n_params / 1e6:.2f}M parameters on rank 0's shard; "
            f"MTP {cfg.mtp.kind} D={depth}; {self.tokens_per_step} tokens/step")

    # ------------------------------------------------------------------ setup helpers
    def _check_data(self, manifest) -> None:
        m, cfg = self.cfg.model, self.cfg
        if manifest.vocab_size > m.vocab_size:
            raise ConfigError(
                f"the dataset's tokenizer has {manifest.vocab_size} tokens but model.vocab_size = "
                f"{m.vocab_size}; set model.vocab_size >= {manifest.vocab_size} (padding to a "
                "multiple of the TP size is fine)")
        if cfg.mtp.depth > manifest.max_depth:
            raise ConfigError(
                f"mtp.depth = {cfg.mtp.depth} but the dataset at {cfg.data.path} was built for "
                f"max_depth {manifest.max_depth}; rebuild it with `mtp prepare --max-depth "
                f"{cfg.mtp.depth}` or lower mtp.depth")
        if manifest.seq_len > m.max_seq_len:
            raise ConfigError(
                f"the dataset's windows have seq_len {manifest.seq_len} but model.max_seq_len = "
                f"{m.max_seq_len}; raise model.max_seq_len")

    def _init_main_model(self, module, ctx: ParallelContext, path: str) -> None:
        """train.init_from: the main model's weights from an export or checkpoint."""
        from pretrain.inference_loading import read_full_state_dict

        try:
            _, full, _, _, source = read_full_state_dict(path)
            load_full_state_dict(module, full, ctx.tp_group, prefix_excluded="tail.objective.")
        except (OSError, ValueError) as err:
            raise ConfigError(f"train.init_from = {path!r}: {err}") from None
        self.logger.print(f"main model initialised from {source}")

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        ds = deepspeed_config(self.cfg, self.layout, self.bf16, not accelerator.is_cpu())
        (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds, indent=1))

    def _marker(self) -> dict:
        lay = self.layout
        return {"config": self.cfg.to_dict(),
                "layout": {"world": lay.world, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp},
                "manifest": str(self.manifest.path), "dataset_fingerprint": self.manifest.fingerprint}

    def _trainer_state(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens,
                "skipped_steps": self.skipped_total, "mtp_weight": self.lam.state_dict(),
                "config": self.cfg.to_dict()}

    def save(self) -> ckpt.CheckpointRef | None:
        """None when the save failed and checkpoint.on_save_error = 'continue'."""
        rank_state = {"loader": self.train_loader.state_dict() if self.train_loader else None}
        keep_going = self.cfg.checkpoint.on_save_error == "continue"
        try:
            ref = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step,
                                       self._trainer_state(), rank_state, self._marker(),
                                       self.cfg.checkpoint.keep_last, remove_partial=keep_going)
        except ckpt.CheckpointSaveError as err:
            if not keep_going:
                raise
            self.save_failures += 1
            self.logger.print(f"ERROR: checkpoint save failed at step {self.step} ({err}); "
                              "training continues (checkpoint.on_save_error = 'continue')")
            return None
        self.logger.print(f"saved checkpoint {ref.path}")
        return ref

    def _report_skipped_data(self) -> None:
        """Shards skipped with data.skip_corrupt are reported by every rank that skips them."""
        loader = self.train_loader
        new = sorted(set(getattr(loader, "corrupt_shards", {})) - self._reported_corrupt)
        for name in new:
            print(f"mtp train: warning: rank {self.rank}: skipping corrupt shard {name} "
                  f"({loader.corrupt_shards[name]}); {loader.num_skipped_samples} samples skipped "
                  "so far (data.skip_corrupt = true)", file=sys.stderr, flush=True)
        self._reported_corrupt.update(new)

    def _maybe_resume(self) -> None:
        if self.resume is None:
            return
        if self.resume == "auto":
            refs = ckpt.complete_checkpoints(self.ckpt_root)
            if not refs:
                self.logger.print(f"no complete checkpoint in {self.ckpt_root}: starting fresh")
                return
            ref = refs[-1]
        else:
            ref = ckpt.resolve_checkpoint(self.resume)
        marker = ref.marker()
        diffs = _compatibility(marker, self.cfg, self.layout)
        if diffs:
            raise ConfigError(
                f"cannot resume from {ref.path}: the checkpoint was written by an incompatible "
                "run:\n  " + "\n  ".join(diffs) +
                "\nresume with the checkpoint's settings (its config is in COMPLETE.json) or "
                "start a new run directory")
        state, rank_state = ckpt.load_checkpoint(self.engine, ref)
        self.step = state["step"]
        self.consumed_tokens = state["consumed_tokens"]
        self.skipped_total = state["skipped_steps"]
        self.lam.load_state_dict(state["mtp_weight"])
        if self.train_loader is not None:
            self.train_loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_states(rank_state["rng"])
        self.logger.print(f"resumed from {ref.path} at step {self.step}")

    # ------------------------------------------------------------------ the step
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _pipe_iter(self, it):
        for batch in it:
            b = self._to_device(batch)
            yield b["input_ids"], (b["labels"], b["loss_mask"])

    def train_step(self, train_iter, lam: float) -> StepStats:
        lr = learning_rate(self.cfg.optim, self.step, self.cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        outputs = []
        if self.tail_loss is None:
            for _ in range(self.layout.grad_accum):
                b = self._to_device(next(train_iter))
                out = self.engine(b["input_ids"], b["labels"], b["loss_mask"], mtp_weight=lam,
                                  step=self.step)
                self.engine.backward(out.loss)
                self.engine.step()
                outputs.append(out)
        else:
            self.tail_loss.mtp_weight, self.tail_loss.step = lam, self.step
            self.tail_loss.outputs.clear()
            self.engine.train_batch(data_iter=train_iter)
            outputs = list(self.tail_loss.outputs)
        return StepStats(outputs=outputs, lr=lr, mtp_weight=lam,
                         applied=self.engine.was_step_applied())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        loader = ShardLoader(
            self.cfg.data.path, "val", dp_rank=self.topo.dp_rank, dp_size=self.layout.dp,
            num_workers=0, batch_size=self.cfg.train.micro_batch_size, seed=self.cfg.train.seed,
            depth=self.cfg.mtp.depth, mask_cross_document=self.cfg.data.mask_cross_document,
            infinite=False) if (self.topo.is_first_stage or self.topo.is_last_stage) else None
        lam = self.lam(self.consumed_tokens)
        self.engine.eval()
        outputs = []
        n = self.cfg.train.eval_batches
        if self.tail_loss is None:
            for i, batch in enumerate(loader):
                if i >= n:
                    break
                b = self._to_device(batch)
                outputs.append(self.engine(b["input_ids"], b["labels"], b["loss_mask"],
                                           mtp_weight=lam, step=self.step))
        else:
            self.tail_loss.outputs.clear()
            rounds = max(1, n // self.layout.grad_accum)
            it = self._pipe_iter(loader) if loader is not None else None
            for _ in range(rounds):
                self.engine.eval_batch(it)
            outputs = list(self.tail_loss.outputs)
        stats = StepStats(outputs=outputs, lr=0.0, mtp_weight=lam, applied=True)
        metrics = gather_to_rank0(stats, self.topo, self.cfg.mtp.depth, prefix="val/")
        t = self.cfg.train
        if t.eval_acceptance_prompts:
            prompt_len = min(64, self.cfg.model.max_seq_len - t.eval_acceptance_tokens
                             - 2 * self.cfg.mtp.depth - 2)
            val = ShardLoader(
                self.cfg.data.path, "val", dp_rank=self.topo.dp_rank, dp_size=self.layout.dp,
                num_workers=0, batch_size=self.cfg.train.micro_batch_size, seed=t.seed,
                depth=0, mask_cross_document=False, infinite=False)
            metrics.update(acceptance_metrics(self.engine.module, val, t.eval_acceptance_prompts,
                                              prompt_len, t.eval_acceptance_tokens,
                                              self.topo.dp_group))
        self.engine.train()
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        self._write_run_files()
        cfg = self.cfg
        train_iter = None
        if self.train_loader is not None:
            it = iter(self.train_loader)
            train_iter = self._pipe_iter(it) if self.tail_loss is not None else it
        logged: list[dict] = []
        validation: list[dict] = []
        exit_code = 0
        t_last, steps_since = time.perf_counter(), 0
        accelerator.reset_peak_memory()
        if self._preemption_requested():  # signalled during start-up: nothing new to save
            self.logger.print("signal received during start-up: exiting for requeue")
            self.logger.close()
            return TrainResult(self.step, EXIT_PREEMPTED, logged)
        while self.step < cfg.train.steps:
            lam = self.lam(self.consumed_tokens)
            stats = self.train_step(train_iter, lam)
            self.step += 1
            steps_since += 1
            self.consumed_tokens += self.tokens_per_step
            self._handle_nonfinite(stats)
            self._report_skipped_data()

            if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                metrics = gather_to_rank0(stats, self.topo, cfg.mtp.depth)
                accelerator.synchronize()
                elapsed = time.perf_counter() - t_last
                tps = steps_since * self.tokens_per_step / elapsed
                metrics.update({
                    "optim/lr": stats.lr, "mtp/lambda": lam,
                    "optim/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "optim/skipped_steps": float(self.skipped_total),
                    "perf/tokens_per_s": tps, "train/consumed_tokens": float(self.consumed_tokens),
                    "perf/mfu": (tps * self.train_flops_per_token / (self.layout.world * self.peak)
                                 if self.peak else None),
                    "memory/peak_gib": ((accelerator.peak_memory_bytes() or 0) / 2**30
                                        if not accelerator.is_cpu() else None),
                })
                if self.rank == 0:
                    self.logger.scalars(self.step, metrics)
                    self.logger.print(format_line(self.step, cfg.train.steps, metrics))
                    logged.append({"step": self.step, **metrics})
                t_last, steps_since = time.perf_counter(), 0

            if self.has_val and self.step % cfg.train.eval_interval == 0:
                val = self.evaluate()
                if self.rank == 0:
                    self.logger.scalars(self.step, val)
                    self.logger.print("validation: " + ", ".join(
                        f"{k[4:]} {v:.4f}" for k, v in val.items()
                        if k.startswith(("val/loss", "val/acceptance"))))
                    validation.append({"step": self.step, **val})
                t_last = time.perf_counter()

            if self._preemption_requested():
                self.logger.print(f"signal received: checkpointing at step {self.step} and exiting")
                self.save()  # if it fails (on_save_error=continue), the resume starts earlier
                exit_code = EXIT_PREEMPTED
                break
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 \
                    and self.step < cfg.train.steps:
                self.save()
        else:
            if cfg.checkpoint.save_at_exit and self.save() is None:
                exit_code = EXIT_SAVE_FAILED  # trained to the end, but the result is not saved
        self.logger.close()
        return TrainResult(self.step, exit_code, logged, validation)

    def _preemption_requested(self) -> bool:
        if dist.get_world_size() == 1:  # nothing to agree on: no device copy, no sync
            return bool(self.preempt.raised)
        flag = torch.tensor([float(self.preempt.raised)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _handle_nonfinite(self, stats: StepStats) -> None:
        if stats.applied:
            self.skipped_in_a_row = 0
            return
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        policy = self.cfg.train.nonfinite
        limit = self.cfg.train.max_skipped_steps
        if policy == "stop" or self.skipped_in_a_row > limit:
            why = ("train.nonfinite = 'stop'" if policy == "stop"
                   else f"{self.skipped_in_a_row} consecutive skipped steps > "
                        f"train.max_skipped_steps = {limit}")
            raise NonFiniteError(
                f"non-finite loss or gradient at step {self.step} ({why}); the step was not "
                "applied and no checkpoint was written from it. Resume from the last checkpoint "
                "with a lower optim.lr, or set train.nonfinite=skip")
        self.logger.print(f"step {self.step}: non-finite loss or gradient, step skipped "
                          f"({self.skipped_in_a_row} in a row)")
