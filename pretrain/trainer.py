"""The training loop: the runtime policy, one DeepSpeed engine with its step runner, the streaming
loader, the schedules, metrics, checkpoints and preemption handling, composed in that order."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger

from data_pipeline import ShardError, load_manifest
from model import accelerator
from model.cost import forward_flops_per_token
from model.generation import DecodingEngine
from pretrain import checkpoint as ckpt
from pretrain import exit_codes
from pretrain.acceptance_eval import acceptance_metrics
from pretrain.config import ConfigError, RunConfig, validate_layout
from pretrain.data_loading import make_loader
from pretrain.deepspeed_config import deepspeed_config
from pretrain.distributed import build_topology, detect_launch_env, init_distributed
from pretrain.engine import build_engine
from pretrain.metrics import MetricsLogger, format_line, peak_flops
from pretrain.preemption import PreemptionFlag
from pretrain.runtime import resolve_runtime
from pretrain.schedules import MTPWeightSchedule, learning_rate
from pretrain.step_metrics import StepStats, gather_to_rank0


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    exit_code: int
    losses: list[dict]  # per logged step: the gathered metrics (rank 0; empty elsewhere)
    validation: list[dict] = field(default_factory=list)  # per validation pass (rank 0)


@dataclass
class Progress:
    """The counters a checkpoint carries besides the weights (and the loader's position)."""

    step: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.consumed_tokens = state["step"], state["consumed_tokens"]
        self.skipped_steps = state["skipped_steps"]


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, train_loader=None,
                 preempt: PreemptionFlag | None = None):
        """`train_loader` replaces the training loader of this rank (an iterable of batches with
        state_dict/load_state_dict), e.g. to feed a reference run the batches of several
        data-parallel ranks."""
        self.cfg, self.resume = cfg, resume
        init_distributed(detect_launch_env(), cfg.train.collective_timeout_s)
        ds_logger.setLevel(logging.WARNING)
        self.rank = dist.get_rank()
        self.layout = validate_layout(cfg, dist.get_world_size())
        self.topo = build_topology(self.layout, cfg.train.collective_timeout_s)
        self.policy = resolve_runtime(cfg, self.layout)
        self.device = accelerator.current_device()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.logger = MetricsLogger(self.run_dir, active=self.rank == 0)
        self.manifest = self._load_manifest()
        self.seq_len = self.manifest.seq_len
        self.tokens_per_step = cfg.train.global_batch_size * self.seq_len

        built = build_engine(cfg, self.layout, self.topo, self.policy, self.device, self.seq_len)
        self.engine, self.runner = built.engine, built.runner
        self.fused_overflow_check = built.fused_overflow_check
        if built.init_source:
            self.logger.print(f"main model initialised from {built.init_source}")
        self.mtp_weight = MTPWeightSchedule(cfg.mtp_weight)
        self._decoding: DecodingEngine | None = None  # acceptance evaluation, built on first use
        flops = forward_flops_per_token(cfg.decoder, self.seq_len)
        self.train_flops_per_token = 3 * (flops["main"] + flops["mtp"])
        self.peak = peak_flops(self.policy.device, cfg.train.peak_tflops)

        reads_data = self.topo.is_first_stage or self.topo.is_last_stage
        self.train_loader = train_loader if train_loader is not None else (
            self._loader("train") if reads_data else None)
        self._reported_corrupt: set[str] = set()
        self._report_skipped_data()
        self.has_val = self.manifest.num_samples("val") > 0 and cfg.train.eval_interval > 0

        self.progress = Progress()
        self.skipped_in_a_row = 0
        self.preempt = preempt if preempt is not None else PreemptionFlag().install()
        self._maybe_resume()  # an incompatible checkpoint is refused before any work
        self._print_header(sum(p.numel() for p in self.engine.module.parameters()))

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------ setup helpers
    def _load_manifest(self):
        data, m = self.cfg.data, self.cfg.model
        try:
            # With skip_corrupt the loader checks (and skips, counting) the shards itself.
            manifest = load_manifest(data.path, check_files=not data.skip_corrupt)
        except ShardError:
            raise
        except ValueError as err:  # no/unreadable manifest, tokenizer replaced after the build
            raise ConfigError(f"data.path = {data.path!r}: {err}") from None
        if manifest.vocab_size > m.vocab_size:
            raise ConfigError(
                f"the dataset's tokenizer has {manifest.vocab_size} tokens but model.vocab_size = "
                f"{m.vocab_size}; set model.vocab_size >= {manifest.vocab_size} (padding to a "
                "multiple of the TP size is fine)")
        if self.cfg.mtp.depth > manifest.max_depth:
            raise ConfigError(
                f"mtp.depth = {self.cfg.mtp.depth} but the dataset at {data.path} was built for "
                f"max_depth {manifest.max_depth}; rebuild it with `mtp prepare --max-depth "
                f"{self.cfg.mtp.depth}` or lower mtp.depth")
        if manifest.seq_len > m.max_seq_len:
            raise ConfigError(
                f"the dataset's windows have seq_len {manifest.seq_len} but model.max_seq_len = "
                f"{m.max_seq_len}; raise model.max_seq_len")
        return manifest

    def _loader(self, purpose: str):
        t = self.cfg.train
        return make_loader(self.cfg.data, purpose, dp_rank=self.topo.dp_rank,
                           dp_size=self.layout.dp, batch_size=t.micro_batch_size, seed=t.seed,
                           depth=self.cfg.mtp.depth, pin_memory=self.policy.pin_memory)

    def _print_header(self, n_params: int) -> None:
        lay, cfg = self.layout, self.cfg
        self.logger.print(
            f"mtp train: world {lay.world} = TP {lay.tp} × PP {lay.pp} × DP {lay.dp}, ZeRO "
            f"{cfg.parallel.zero_stage}, grad accumulation {lay.grad_accum}; "
            f"{n_params / 1e6:.2f}M parameters on rank 0's shard; MTP {cfg.mtp.kind} "
            f"D={cfg.mtp.depth}; {self.tokens_per_step} tokens/step\n"
            f"runtime: {self.policy.describe()}")

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        ds = deepspeed_config(self.cfg, self.layout, self.policy)
        (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds, indent=1))
        (self.run_dir / "runtime.json").write_text(json.dumps(self.policy.to_dict(), indent=1))

    def _marker(self) -> dict:
        lay = self.layout
        return {"config": self.cfg.to_dict(),
                "layout": {"world": lay.world, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp},
                "manifest": str(self.manifest.path),
                "dataset_fingerprint": self.manifest.fingerprint}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> ckpt.CheckpointRef | None:
        """None when the save failed and checkpoint.on_save_error = 'continue'."""
        trainer_state = {**self.progress.state_dict(), "mtp_weight": self.mtp_weight.state_dict(),
                         "config": self.cfg.to_dict()}
        rank_state = {"loader": self.train_loader.state_dict() if self.train_loader else None}
        keep_going = self.cfg.checkpoint.on_save_error == "continue"
        try:
            ref = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, trainer_state,
                                       rank_state, self._marker(), self.cfg.checkpoint.keep_last,
                                       remove_partial=keep_going)
        except ckpt.CheckpointSaveError as err:
            if not keep_going:
                raise
            self.logger.print(f"ERROR: checkpoint save failed at step {self.step} ({err}); "
                              "training continues (checkpoint.on_save_error = 'continue')")
            return None
        self.logger.print(f"saved checkpoint {ref.path}")
        return ref

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
        diffs = ckpt.resume_differences(ref.marker(), self.cfg, self.layout)
        if diffs:
            raise ConfigError(
                f"cannot resume from {ref.path}: the checkpoint was written by an incompatible "
                "run:\n  " + "\n  ".join(diffs) +
                "\nresume with the checkpoint's settings (its config is in COMPLETE.json) or "
                "start a new run directory")
        state, rank_state = ckpt.load_checkpoint(self.engine, ref)
        self.progress.load_state_dict(state)
        self.mtp_weight.load_state_dict(state["mtp_weight"])
        if self.train_loader is not None:
            self.train_loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_states(rank_state["rng"])
        self.logger.print(f"resumed from {ref.path} at step {self.step}")

    # ------------------------------------------------------------------ steps
    def train_step(self, batches, mtp_weight: float) -> StepStats:
        lr = learning_rate(self.cfg.optim, self.step, self.cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        outputs = self.runner.train_step(batches, mtp_weight, self.step)
        return StepStats(outputs=outputs, lr=lr, mtp_weight=mtp_weight,
                         applied=self.engine.was_step_applied())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        reads_data = self.topo.is_first_stage or self.topo.is_last_stage
        batches = iter(self._loader("validation")) if reads_data else None
        mtp_weight = self.mtp_weight(self.progress.consumed_tokens)
        self.engine.eval()
        outputs = self.runner.evaluate(batches, self.cfg.train.eval_batches, mtp_weight,
                                       self.step)
        stats = StepStats(outputs=outputs, lr=0.0, mtp_weight=mtp_weight, applied=True)
        metrics = gather_to_rank0(stats, self.topo, self.cfg.mtp.depth, prefix="val/")
        t = self.cfg.train
        if t.eval_acceptance_prompts:
            prompt_len = min(64, self.cfg.model.max_seq_len - t.eval_acceptance_tokens
                             - 2 * self.cfg.mtp.depth - 2)
            if self._decoding is None:
                self._decoding = DecodingEngine(self.engine.module,
                                                graphs=self.policy.device_graphs, compile=False)
            metrics.update(acceptance_metrics(
                self._decoding, self._loader("prompts"), t.eval_acceptance_prompts,
                prompt_len, t.eval_acceptance_tokens, self.topo.dp_group))
        self.engine.train()
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        self._write_run_files()
        cfg = self.cfg
        batches = iter(self.train_loader) if self.train_loader is not None else None
        result = TrainResult(self.step, exit_codes.OK, [], [])
        self._t_last, self._steps_since = time.perf_counter(), 0
        accelerator.reset_peak_memory()
        if self._preemption_requested():  # signalled during start-up: nothing new to save
            self.logger.print("signal received during start-up: exiting for requeue")
            result.exit_code = exit_codes.PREEMPTED
        while result.exit_code == exit_codes.OK and self.step < cfg.train.steps:
            stats = self.train_step(batches, self.mtp_weight(self.progress.consumed_tokens))
            self.progress.step += 1
            self.progress.consumed_tokens += self.tokens_per_step
            self._steps_since += 1
            self._handle_nonfinite(stats)
            self._report_skipped_data()
            if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                self._log_step(stats, result)
            if self.has_val and self.step % cfg.train.eval_interval == 0:
                self._validate(result)
            if self._preemption_requested():
                self.logger.print(f"signal received: checkpointing at step {self.step} and exiting")
                self.save()  # if it fails (on_save_error=continue), the resume starts earlier
                result.exit_code = exit_codes.PREEMPTED
            elif cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 \
                    and self.step < cfg.train.steps:
                self.save()
        if result.exit_code == exit_codes.OK and cfg.checkpoint.save_at_exit \
                and self.save() is None:
            result.exit_code = exit_codes.SAVE_FAILED  # trained to the end, but not saved
        self.logger.close()
        result.step = self.step
        return result

    def _log_step(self, stats: StepStats, result: TrainResult) -> None:
        metrics = gather_to_rank0(stats, self.topo, self.cfg.mtp.depth)
        accelerator.synchronize()
        tps = self._steps_since * self.tokens_per_step / (time.perf_counter() - self._t_last)
        peak = accelerator.peak_memory_bytes()
        metrics.update({
            "optim/lr": stats.lr, "mtp/weight": stats.mtp_weight,
            "optim/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "optim/skipped_steps": float(self.progress.skipped_steps),
            "perf/tokens_per_s": tps,
            "train/consumed_tokens": float(self.progress.consumed_tokens),
            "perf/mfu": (tps * self.train_flops_per_token / (self.layout.world * self.peak)
                         if self.peak else None),
            "memory/peak_gib": peak / 2**30 if peak is not None else None,
        })
        if self.rank == 0:
            self.logger.scalars(self.step, metrics)
            self.logger.print(format_line(self.step, self.cfg.train.steps, metrics))
            result.losses.append({"step": self.step, **metrics})
        self._t_last, self._steps_since = time.perf_counter(), 0

    def _validate(self, result: TrainResult) -> None:
        val = self.evaluate()
        if self.rank == 0:
            self.logger.scalars(self.step, val)
            self.logger.print("validation: " + ", ".join(
                f"{k[4:]} {v:.4f}" for k, v in val.items()
                if k.startswith(("val/loss", "val/acceptance"))))
            result.validation.append({"step": self.step, **val})
        self._t_last = time.perf_counter()  # validation time does not count as training time

    def _preemption_requested(self) -> bool:
        if dist.get_world_size() == 1:  # nothing to agree on: no device copy, no sync
            return bool(self.preempt.raised)
        flag = torch.tensor([float(self.preempt.raised)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _report_skipped_data(self) -> None:
        """Shards skipped with data.skip_corrupt are reported by every rank that skips them."""
        loader = self.train_loader
        new = sorted(set(getattr(loader, "corrupt_shards", {})) - self._reported_corrupt)
        for name in new:
            print(f"mtp train: warning: rank {self.rank}: skipping corrupt shard {name} "
                  f"({loader.corrupt_shards[name]}); {loader.num_skipped_samples} samples skipped "
                  "so far (data.skip_corrupt = true)", file=sys.stderr, flush=True)
        self._reported_corrupt.update(new)

    def _handle_nonfinite(self, stats: StepStats) -> None:
        if stats.applied:
            self.skipped_in_a_row = 0
            return
        self.progress.skipped_steps += 1
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
