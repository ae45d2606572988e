"""The training loop: the runtime policy, one DeepSpeed engine with its step runner, the streaming
loader, the schedules, metrics, checkpoints and preemption handling, composed in that order."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger

from model import accelerator
from model.cost import forward_flops_per_token
from model.generation import DecodingEngine
from model.generation.runner import positions_needed
from pretrain import checkpoint as ckpt
from pretrain import exit_codes, quiet
from pretrain.acceptance_eval import acceptance_metrics
from pretrain.checkpoint_state import host_memory_available, host_memory_warning, owned
from pretrain.config import ConfigError, RunConfig, validate_layout
from pretrain.data_loading import load_manifests, make_loader, weighted_validation
from pretrain.deepspeed_config import deepspeed_config
from pretrain.distributed import build_topology, init_distributed
from pretrain.engine import build_engine
from pretrain.launch import detect_launch_env, local_world_size
from pretrain.memory_plan import GIB, plan_memory
from pretrain.memory_snapshot import MemorySnapshot
from pretrain.metrics import MetricsLogger, format_line, peak_flops
from pretrain.model_builder import full_parameter_names
from pretrain.preemption import PreemptionFlag
from pretrain.run_lock import STALE_AFTER_S, RunDirBusy, RunLock
from pretrain.runtime import resolve_runtime
from pretrain.schedules import MTPWeightSchedule, learning_rate
from pretrain.step_metrics import StepStats, gather_to_rank0


class NonFiniteError(RuntimeError):
    pass


class RunDirLost(RuntimeError):
    """Another job took the run directory's lock over while this one was running (its heartbeat
    stalled long enough to look dead): this job must not write another checkpoint there."""


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
        self.run_dir = Path(cfg.run_dir)
        self.run_lock: RunLock | None = None
        self.logger: MetricsLogger | None = None
        self.memory: MemorySnapshot | None = None
        try:
            self._set_up(cfg, train_loader, preempt)
        except BaseException:
            self.close()
            raise

    def _set_up(self, cfg: RunConfig, train_loader, preempt) -> None:
        self.topo = build_topology(self.layout, cfg.train.collective_timeout_s)
        self.policy = resolve_runtime(cfg, self.layout)
        self.device = accelerator.current_device()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.manifests = load_manifests(cfg)  # [(source label, manifest)], checked
        self.manifest = self.manifests[0][1]
        self._take_run_dir()  # before anything is written there
        self.logger = MetricsLogger(self.run_dir, active=self.rank == 0)
        self.seq_len = self.manifest.seq_len
        self.tokens_per_step = cfg.train.global_batch_size * self.seq_len

        # from here on, so that the weights and optimizer states are in the history too
        self.memory = MemorySnapshot(cfg.train.memory_snapshot_steps, self.run_dir, self.rank)
        built = build_engine(cfg, self.layout, self.topo, self.policy, self.device, self.seq_len,
                             self.manifest.eos_id)
        self.engine, self.runner = built.engine, built.runner
        named, copies = full_parameter_names(self.engine.module)
        self.owners = [o if o.name not in copies else dataclasses.replace(o, writes=False)
                       for o in owned(named, self.topo.tp_rank, self.layout.tp, self.topo.dp_rank)]
        self.writer = ckpt.CheckpointWriter(pinned=self.policy.pin_memory)
        self._t_last, self._steps_since = time.perf_counter(), 0  # throughput window
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
        self._reported_retries = 0
        self._report_skipped_data()
        # Validation runs over each source that has a validation split.
        self.val_sources = [name for name, m in self.manifests if m.num_samples("val") > 0]
        self.has_val = bool(self.val_sources) and cfg.train.eval_interval > 0

        self.progress = Progress()
        self.skipped_in_a_row = 0
        self.preempt = preempt if preempt is not None else PreemptionFlag().install()
        self._maybe_resume()  # an incompatible checkpoint is refused before any work
        self._print_header(sum(p.numel() for p in self.engine.module.parameters()))
        self._check_memory_plan()

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------ setup helpers
    def _loader(self, purpose: str, source: str | None = None):
        t = self.cfg.train
        return make_loader(self.cfg.data, purpose, dp_rank=self.topo.dp_rank,
                           dp_size=self.layout.dp, batch_size=t.micro_batch_size, seed=t.seed,
                           depth=self.cfg.mtp.depth, pin_memory=self.policy.pin_memory,
                           global_batch_size=t.global_batch_size, source=source)

    def _print_header(self, n_params: int) -> None:
        lay, cfg = self.layout, self.cfg
        p = cfg.parallel
        sp = " (re-gather)" if p.sequence_parallel_regather else ""
        memory = [f"sequence-parallel{sp}" if p.sequence_parallel else "",
                  f"recompute {cfg.model.recompute}" if cfg.model.recompute != "none" else ""]
        self.logger.print(
            f"mtp train: world {lay.world} = TP {lay.tp} × PP {lay.pp} × DP {lay.dp}, ZeRO "
            f"{cfg.parallel.zero_stage}{''.join(', ' + m for m in memory if m)}, grad "
            f"accumulation {lay.grad_accum}; "
            f"{n_params / 1e6:.2f}M parameters on rank 0's shard; MTP {cfg.mtp.kind} "
            f"D={cfg.mtp.depth}; {self.tokens_per_step} tokens/step\n"
            f"runtime: {self.policy.describe()}")

    def _check_memory_plan(self) -> None:
        """On a GPU: the planned peak per GPU (pretrain/memory_plan.py), and a warning before
        the first step when it exceeds the card."""
        capacity = accelerator.device_memory_bytes()
        if capacity is None:
            return
        plan = plan_memory(self.cfg, self.layout, self.seq_len, self.policy.bf16,
                           self.policy.compile, capacity, self.policy.loss_kernels)
        self.logger.print(f"memory plan: {plan.total / GIB:.1f} GiB per GPU of "
                          f"{capacity / GIB:.1f} GiB (`mtp plan` shows the parts)")
        if not plan.fits:
            self.logger.print(
                f"WARNING: the memory plan ({plan.total / GIB:.1f} GiB per GPU) exceeds this "
                f"card's {capacity / GIB:.1f} GiB: expect an out-of-memory error. Options: "
                "model.recompute=selective or full, parallel.sequence_parallel=true (TP > 1), "
                "a smaller train.micro_batch_size, more TP/PP, or ZeRO 2/3 over more GPUs")

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        ds = deepspeed_config(self.cfg, self.layout, self.policy)
        (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds, indent=1))
        runtime = {**self.policy.to_dict(), "suppressed_notices": list(quiet.SUPPRESSED)}
        (self.run_dir / "runtime.json").write_text(json.dumps(runtime, indent=1))

    # ------------------------------------------------------------------ one writer per run dir
    def _take_run_dir(self) -> None:
        """Global rank 0 takes RUN_DIR's lock (pretrain/run_lock.py) for the job; the other ranks
        wait for the outcome, so a refused job stops on every rank before any of them writes."""
        refusal = None
        if self.rank == 0:
            def warn(text: str) -> None:
                print(f"mtp train: warning: {text}", file=sys.stderr, flush=True)

            wait_s = min(STALE_AFTER_S, self.cfg.train.collective_timeout_s / 2)
            try:
                if self.run_dir.exists() and not self.run_dir.is_dir():
                    raise NotADirectoryError(f"{self.run_dir} is a file")
                self.run_lock = RunLock(self.run_dir).acquire(wait_s=wait_s, notify=warn)
            except RunDirBusy as err:
                refusal = str(err)
            except OSError as err:
                refusal = (f"run_dir = {str(self.run_dir)!r} cannot be written ({err}); choose a "
                           "writable directory for run_dir")
        if self._on_any_rank(refusal is not None):
            raise ConfigError(refusal or "run_dir is in use by another job (rank 0 says which)")

    def _on_any_rank(self, flag: bool) -> bool:
        if dist.get_world_size() == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=accelerator.current_device())
        dist.all_reduce(t)
        return t.item() > 0

    def _check_run_dir_held(self) -> None:
        """Before a checkpoint: is the run directory still this job's? (one collective)"""
        why = self.run_lock.lost() if self.run_lock is not None else None
        if self._on_any_rank(why is not None):
            raise RunDirLost(
                f"{why or 'rank 0 lost the run directory lock'}: another job writes "
                f"run_dir = {str(self.run_dir)!r} now, so this one stops without writing "
                f"checkpoint step {self.step}; resume from that job's checkpoints, not this one's")

    def close(self) -> None:
        """Release the run directory (idempotent). Runs after train() and on every failure; a
        background checkpoint write still running is let finish first (unmarked if a peer's
        part is missing), so that no file lands in a run directory another job may own."""
        if getattr(self, "writer", None) is not None:
            self.writer.wait_local()
        self._write_memory_history("the run stopped")  # a failure: what the window holds
        if self.logger is not None:
            self.logger.close()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _write_memory_history(self, why: str) -> None:
        if self.memory is None or not self.memory.recording:
            return
        try:
            path = self.memory.stop()
        except (OSError, RuntimeError) as err:  # never hide the failure that brought us here
            print(f"could not write the memory history ({why}): {err}", file=sys.stderr)
            return
        print(f"{why}: memory history written to {path} (open it at "
              "https://pytorch.org/memory_viz)", file=sys.stderr, flush=True)

    def _layout(self) -> dict:
        lay = self.layout
        return {"world": lay.world, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                "zero": self.cfg.parallel.zero_stage}

    def _marker(self) -> dict:
        # The data position is global (samples consumed by all ranks together, per source):
        # saved once, from rank 0 (always a data-reading rank), and any layout resumes from it.
        position = self.train_loader.state_dict() if self.train_loader is not None else None
        return {"config": self.cfg.to_dict(), "layout": self._layout(),
                "runtime": self.policy.to_dict(),
                "manifest": str(self.manifest.path),
                "dataset_fingerprint": self.manifest.fingerprint,
                "data_position": position}

    def _adam_step(self) -> int:
        """Optimizer steps Adam has taken (steps skipped for non-finite gradients excluded)."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in inner.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    # ------------------------------------------------------------------ checkpoints
    def save(self, final: bool = False) -> ckpt.CheckpointRef | None:
        """Collective. Interval saves may finish in the background (checkpoint.async_save); a
        `final` one (at the end, or on a signal) is on disk when this returns, after any earlier
        one. None when a save failed and checkpoint.on_save_error = 'continue'."""
        self._check_run_dir_held()
        trainer_state = {**self.progress.state_dict(), "mtp_weight": self.mtp_weight.state_dict(),
                         "adam_step": self._adam_step()}
        keep_going = self.cfg.checkpoint.on_save_error == "continue"
        background = self.policy.async_save and not final
        t0 = time.perf_counter()
        try:
            ref = self.writer.save(
                self.engine, self.owners, self.ckpt_root, self.step, trainer_state,
                self._marker(), self.cfg.checkpoint.keep_last, remove_partial=keep_going,
                background=background, wait_timeout_s=2 * self.cfg.train.collective_timeout_s)
            if final:
                self.writer.finish()
        except ckpt.CheckpointSaveError as err:
            if not keep_going:
                raise
            self.logger.print(f"ERROR: checkpoint save failed at step {err.step} ({err}); "
                              "training continues (checkpoint.on_save_error = 'continue')")
            return None
        stall = time.perf_counter() - t0
        self._report_written()  # the previous background save, which this one waited for
        self._report_reserved()
        self.logger.print(f"{'writing' if background else 'saved'} checkpoint {ref.path} "
                          f"(training paused {stall:.1f} s)")
        self._t_last += stall  # a save's pause is not training time
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
        marker = ref.marker()
        diffs = ckpt.resume_differences(marker, self.cfg)
        if diffs:
            raise ConfigError(
                f"cannot resume from {ref.path}: the checkpoint was written by an incompatible "
                f"run ({'; '.join(diffs)}); resume with the checkpoint's settings (its config is "
                "in COMPLETE.json) or start a new run directory")
        before, now = ckpt.layout_of(marker), {k: v for k, v in self._layout().items()
                                               if k != "world"}
        if before != now:
            self.logger.print(f"resharding {ref.path}: written at {_describe(before)}, resuming "
                              f"at {_describe(now)}")
        t0 = time.perf_counter()
        state = ckpt.load_checkpoint(self.engine, self.owners, ref, same_layout=before == now)
        self._record_history({"event": "resume", "checkpoint": str(ref.path), "step": ref.step,
                              "from_layout": before, "to_layout": now,
                              "resharded": before != now,
                              "load_seconds": round(time.perf_counter() - t0, 3)})
        self.progress.load_state_dict(state)
        self.mtp_weight.load_state_dict(state["mtp_weight"])
        if self.train_loader is not None:
            position = ref.marker().get("data_position")
            if position is None:
                raise ConfigError(f"cannot resume from {ref.path}: its COMPLETE.json records no "
                                  "data position (written by an older version); start a new run")
            try:
                self.train_loader.load_state_dict(position)
            except ValueError as err:
                raise ConfigError(f"cannot resume from {ref.path}: {err}") from None
        self.logger.print(f"resumed from {ref.path} at step {self.step}")

    def _record_history(self, event: dict) -> None:
        """One JSON line per event in RUN_DIR/history.jsonl (rank 0): resumes and reshards."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "history.jsonl", "a") as fh:
            fh.write(json.dumps({"time": time.time(), **event}) + "\n")

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
        """val/... metrics; with a mixture, val/NAME/... per source and val/... their mean
        weighted like the training mixture."""
        reads_data = self.topo.is_first_stage or self.topo.is_last_stage
        mtp_weight = self.mtp_weight(self.progress.consumed_tokens)
        self.engine.eval()
        per_source = {}
        for name in self.val_sources:
            batches = iter(self._loader("validation", name)) if reads_data else None
            outputs = self.runner.evaluate(batches, self.cfg.train.eval_batches, mtp_weight,
                                           self.step)
            stats = StepStats(outputs=outputs, lr=0.0, mtp_weight=mtp_weight, applied=True)
            per_source[name] = gather_to_rank0(stats, self.topo, self.cfg.mtp.depth, prefix="val/")
        metrics = weighted_validation(per_source, self.cfg.data)
        t = self.cfg.train
        if t.eval_acceptance_prompts:
            room = positions_needed(0, t.eval_acceptance_tokens, self.cfg.mtp.depth)
            prompt_len = min(64, self.cfg.model.max_seq_len - room)
            if self._decoding is None:
                self._decoding = DecodingEngine(self.engine.module,
                                                graphs=self.policy.device_graphs, compile=False)
            metrics.update(acceptance_metrics(
                self._decoding, self._loader("prompts", self.val_sources[0]),
                t.eval_acceptance_prompts, prompt_len, t.eval_acceptance_tokens,
                self.topo.dp_group))
        self.engine.train()
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> TrainResult:
        self._write_run_files()
        cfg = self.cfg
        batches = iter(self.train_loader) if self.train_loader is not None else None
        self._prepare_background_saves()  # after the loader's workers are forked
        result = TrainResult(self.step, exit_codes.OK, [], [])
        self._t_last, self._steps_since = time.perf_counter(), 0
        accelerator.reset_peak_memory()
        if self._preemption_requested():  # signalled during start-up: nothing new to save
            self.logger.print("signal received during start-up: exiting for requeue")
            result.exit_code = exit_codes.PREEMPTED
        while result.exit_code == exit_codes.OK and self.step < cfg.train.steps:
            try:
                stats = self.train_step(batches, self.mtp_weight(self.progress.consumed_tokens))
            except torch.OutOfMemoryError:
                self._write_memory_history(f"step {self.step + 1} ran out of memory")
                raise
            self.progress.step += 1
            t0 = time.perf_counter()
            if (path := self.memory.step_done()) is not None:
                self._t_last += time.perf_counter() - t0  # writing it is not training time
                self.logger.print(f"memory history of the start-up and the first "
                                  f"{cfg.train.memory_snapshot_steps} step(s) written to {path} "
                                  "(one file per rank; open it at https://pytorch.org/memory_viz)")
            self.progress.consumed_tokens += self.tokens_per_step
            self._steps_since += 1
            self._report_written()
            self._handle_nonfinite(stats)
            self._report_skipped_data()
            if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                self._log_step(stats, result)
            if self.has_val and self.step % cfg.train.eval_interval == 0:
                self._validate(result)
            if self._preemption_requested():
                self.logger.print(f"signal received: checkpointing at step {self.step} and exiting")
                self.save(final=True)  # if it fails (on_save_error=continue), resume earlier
                result.exit_code = exit_codes.PREEMPTED
            elif cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 \
                    and self.step < cfg.train.steps:
                self.save()
        if result.exit_code == exit_codes.OK and cfg.checkpoint.save_at_exit:
            if self.save(final=True) is None:
                result.exit_code = exit_codes.SAVE_FAILED  # trained to the end, but not saved
        else:
            self._finish_background_save(result)
        self._write_memory_history(f"training ended at step {self.step}, inside "
                                   "train.memory_snapshot_steps")
        result.step = self.step
        return result

    def _prepare_background_saves(self) -> None:
        """The host buffers of background saves, allocated while the first steps run (see
        CheckpointWriter.prepare), when an interval save is ahead; reported at the first save.
        Every rank reads the free host memory before any allocates."""
        interval = self.cfg.checkpoint.interval
        if not (self.policy.async_save and interval and self.step + interval < self.cfg.train.steps):
            return
        available = host_memory_available()
        dist.barrier()
        per_rank = self.writer.prepare(self.owners)
        if warning := host_memory_warning(per_rank, local_world_size(), available):
            self.logger.print(f"WARNING: {warning}")

    def _report_reserved(self) -> None:
        if (reserved := self.writer.take_reserved()) is None:
            return
        gib, seconds, problem = reserved
        how = ("page-locked beside the first steps (which wait for it)"
               if self.policy.pin_memory else "allocated beside the first steps")
        self.logger.print(f"host buffers for background saves: {gib:.1f} GiB on rank 0, {how}, "
                          f"in {seconds:.1f} s")
        if problem is not None:
            # Said by the rank it happened on (the logger speaks for rank 0 only).
            print(f"WARNING: rank {self.rank}: reserving the host buffers of background saves "
                  f"failed ({problem}); its saves copy into unpinned memory instead (slower)",
                  file=sys.stderr, flush=True)

    def _report_written(self) -> None:
        if (written := self.writer.take_written()) is not None:
            self.logger.print(f"checkpoint step {written[0]} is on disk (written in the "
                              f"background in {written[1]:.1f} s)")

    def _finish_background_save(self, result: TrainResult) -> None:
        """A background save still running when training stops is waited for."""
        try:
            self.writer.finish()
            self._report_written()
        except ckpt.CheckpointSaveError as err:
            if self.cfg.checkpoint.on_save_error != "continue":
                raise
            self.logger.print(f"ERROR: checkpoint save failed at step {err.step} ({err})")
            if result.exit_code == exit_codes.OK:
                result.exit_code = exit_codes.SAVE_FAILED

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
            **self._tokens_per_source(),
            "data/remote_retries": float(len(getattr(self.train_loader, "retries", []))),
            "perf/mfu": (tps * self.train_flops_per_token / (self.layout.world * self.peak)
                         if self.peak else None),
            "memory/peak_gib": peak / 2**30 if peak is not None else None,
        })
        if self.rank == 0:
            self.logger.scalars(self.step, metrics)
            self.logger.print(format_line(self.step, self.cfg.train.steps, metrics))
            result.losses.append({"step": self.step, **metrics})
        self._t_last, self._steps_since = time.perf_counter(), 0

    def _tokens_per_source(self) -> dict[str, float]:
        """data/tokens/NAME: input tokens consumed from each source by all ranks together."""
        per_source = getattr(self.train_loader, "consumed_per_source", None)
        if per_source is None:  # a rank without data, or a replacement loader
            return {}
        return {f"data/tokens/{name}": float(n * self.seq_len)
                for name, n in per_source().items()}

    def _validate(self, result: TrainResult) -> None:
        val = self.evaluate()
        if self.rank == 0:
            self.logger.scalars(self.step, val)
            self.logger.print("validation: " + ", ".join(
                f"{k[4:]} {v:.4f}" for k, v in val.items()
                if k.startswith(("val/loss", "val/acceptance"))
                or (self.cfg.data.is_mixture and k.endswith("/loss/total"))))
            result.validation.append({"step": self.step, **val})
        self._t_last = time.perf_counter()  # validation time does not count as training time

    def _preemption_requested(self) -> bool:
        if dist.get_world_size() == 1:  # nothing to agree on: no device copy, no sync
            return bool(self.preempt.raised)
        flag = torch.tensor([float(self.preempt.raised)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _report_skipped_data(self) -> None:
        """Shards skipped with data.skip_corrupt, and retried remote reads, are reported by
        every rank that meets them."""
        loader = self.train_loader
        retries = getattr(loader, "retries", [])
        for line in retries[self._reported_retries:]:
            print(f"mtp train: warning: rank {self.rank}: remote read failed, retrying: {line}",
                  file=sys.stderr, flush=True)
        self._reported_retries = len(retries)
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


def _describe(layout: dict) -> str:
    return f"TP {layout['tp']} × PP {layout['pp']} × DP {layout['dp']}, ZeRO {layout['zero']}"
