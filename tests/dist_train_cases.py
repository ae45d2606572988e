"""Rank functions running the real Trainer in gloo worlds."""

from __future__ import annotations

from pathlib import Path

KEYS = ("loss/total", "loss/main", "loss/depth_1", "loss/depth_2", "accuracy/depth_0",
        "optim/grad_norm", "optim/lr", "mtp/weight")


def _curve(result) -> list[dict]:
    return [{k: m[k] for k in KEYS if k in m} | {"step": m["step"]} for m in result.losses]


# Adam's ε for the layout comparisons. With the default 1e-8, a gradient element that is ~0 up
# to fp32 summation order (terms cancelling in a sum that TP, PP and DP add in different orders)
# gets a full ±lr step whose sign is that rounding noise; at the tiny model's lr of 1e-2 this
# grew a 1e-6 difference into 0.3 % of the gradient norm by step 6 (TP2, parallel heads).
# At 1e-6 such elements barely move, and real layout bugs still show as O(1) differences.
LAYOUT_OPTIM = {"eps": 1e-6}


def reference_runs(rank, world, data, tmp, kinds, dp_sizes, attention_kinds=()):
    """World 1: for each kind and data-parallel size, the single-process run fed the same global
    batches as that many DP ranks would read; for `attention_kinds` also at DP 1 with
    document-masked attention (key (kind, 1, "attention"))."""
    from data_pipeline import ShardLoader
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import MergedLoader, tiny_run

    out = {}
    runs = [(kind, dp, None) for kind in kinds for dp in dp_sizes]
    runs += [(kind, 1, "attention") for kind in attention_kinds]
    for kind, dp, variant in runs:
        name = f"ref-{kind}-dp{dp}" + (f"-{variant}" if variant else "")
        sections = {"optim": LAYOUT_OPTIM}
        if variant:
            sections["data"] = {"mask_cross_document": variant}
        cfg = config_from_dict(tiny_run(Path(data), Path(tmp) / name, kind, **sections))
        loaders = [ShardLoader(cfg.data.path, "train", dp_rank=r, dp_size=dp, num_workers=0,
                               batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                               depth=cfg.mtp.depth, mask_cross_document=True,
                               shuffle_buffer=cfg.data.shuffle_buffer) for r in range(dp)]
        per_rank = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        result = Trainer(cfg, train_loader=MergedLoader(loaders, per_rank)).train()
        out[(kind, dp) if variant is None else (kind, dp, variant)] = _curve(result)
    return out


def layout_runs(rank, world, data, tmp, name, sections, kinds):
    """For each kind: an uninterrupted 6-step run (checkpoints at 3 and 6), then a second run that
    resumes from the step-3 checkpoint. Returns, on rank 0, every rank's: both loss curves (as
    rank 0 logs them) and the host buffers of the first run's saves."""
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    out = {}
    for kind in kinds:
        run_a = Path(tmp) / f"{name}-{kind}-a"
        sections = {**sections, "optim": LAYOUT_OPTIM}
        trainer = Trainer(config_from_dict(tiny_run(Path(data), run_a, kind, **sections)))
        a = trainer.train()
        b_cfg = config_from_dict(tiny_run(Path(data), Path(tmp) / f"{name}-{kind}-b", kind, **sections))
        b = Trainer(b_cfg, resume=str(run_a / "checkpoints" / "step_00000003")).train()
        # With background saves: host buffers the saves had to allocate themselves (none when
        # the reservation sized every fragment right), on this rank.
        out[kind] = {"a": _curve(a), "b": _curve(b),
                     "save_allocations": trainer.writer._buffers.allocated_by_saves,
                     "reserved": trainer.writer._buffers.reserved_bytes}
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return gathered if rank == 0 else None


def _nan_loss_at(trainer, bad_steps):
    """Make the loss NaN on the given (0-based) steps, through a forward hook on the tail."""
    import torch

    tail = trainer.engine.module.tail

    def hook(_module, _inputs, out):
        if trainer.step in bad_steps:
            return out._replace(loss=out.loss * torch.tensor(float("nan")))
        return out

    tail.register_forward_hook(hook)


def behaviours(rank, world, data, tmp):
    """World 1: non-finite handling, refused resumes, a crash inside a save, λ schedule."""
    import torch

    from pretrain import checkpoint as ckpt
    from pretrain.config import ConfigError, config_from_dict
    from pretrain.trainer import NonFiniteError, Trainer
    from tests.train_fixtures import tiny_run

    data, tmp = Path(data), Path(tmp)
    out = {}

    # 1. nonfinite=skip: the bad step changes no weight and training goes on.
    cfg = config_from_dict(tiny_run(data, tmp / "skip", train={"nonfinite": "skip"}))
    tr = Trainer(cfg)
    _nan_loss_at(tr, {2})
    before = {}

    def snapshot_hook(_m, _i, o):
        if tr.step == 2 and not before:
            before.update({n: p.detach().clone() for n, p in tr.engine.module.named_parameters()})
        return o

    tr.engine.module.tail.register_forward_hook(snapshot_hook)
    res = tr.train()
    out["skip_steps"] = [m["step"] for m in res.losses]
    out["skip_skipped"] = [m["optim/skipped_steps"] for m in res.losses]
    out["fused_overflow_check"] = tr.fused_overflow_check
    out["skip_final_finite"] = all(torch.isfinite(p).all().item() for p in tr.engine.module.parameters())
    out["skip_ckpts"] = [r.step for r in ckpt.complete_checkpoints(tmp / "skip" / "checkpoints")]

    # 2. nonfinite=stop: a clear error, and no checkpoint at or after the bad step.
    cfg = config_from_dict(tiny_run(data, tmp / "stop", train={"nonfinite": "stop"},
                                    checkpoint={"interval": 2, "keep_last": 5}))
    tr = Trainer(cfg)
    _nan_loss_at(tr, {3})
    try:
        tr.train()
        out["stop_error"] = None
    except NonFiniteError as err:
        out["stop_error"] = str(err)
    out["stop_ckpts"] = [r.step for r in ckpt.complete_checkpoints(tmp / "stop" / "checkpoints")]

    # 3. A crash inside the step-6 save: no COMPLETE marker, `latest` still names step 3, and
    #    --resume auto continues from step 3 to the same losses.
    cfg = config_from_dict(tiny_run(data, tmp / "crash"))
    tr = Trainer(cfg)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if "step_00000006" in str(f) and "trainer_rank" in str(f):
            raise OSError(28, "No space left on device (injected)")
        return real_save(obj, f, *a, **k)

    torch.save = failing_save
    try:
        tr.train()
        out["crash_error"] = None
    except ckpt.CheckpointSaveError as err:  # names the failed write, on every rank alike
        out["crash_error"] = str(err)
    finally:
        torch.save = real_save
    root = tmp / "crash" / "checkpoints"
    out["crash_complete"] = [r.step for r in ckpt.complete_checkpoints(root)]
    out["crash_latest"] = (root / "latest").read_text()
    out["crash_partial_exists"] = (root / "step_00000006").is_dir()
    resumed = Trainer(config_from_dict(tiny_run(data, tmp / "crash")), resume="auto").train()
    clean = Trainer(config_from_dict(tiny_run(data, tmp / "clean"))).train()
    out["crash_resume"] = ([m["loss/total"] for m in resumed.losses],
                           [m["loss/total"] for m in clean.losses[3:]])

    # 4. Resuming with a config that cannot work is refused, naming what differs.
    errors = {}
    for label, sections in (("shape", {"model": {"hidden_size": 64}}),
                            ("mtp", {"mtp": {"kind": "parallel"}}),
                            ("batch", {"train": {"global_batch_size": 8}})):
        try:
            Trainer(config_from_dict(tiny_run(data, tmp / "clean", **sections)), resume="auto")
            errors[label] = None
        except ConfigError as err:
            errors[label] = str(err)
    out["refusals"] = errors

    # 5. λ follows consumed tokens (boundary after 3 steps of 4 × 16 tokens) and is saved.
    out["mtp_weight"] = [m["mtp/weight"] for m in clean.losses]
    import json

    marker = json.loads((tmp / "clean" / "checkpoints" / "step_00000006" / "COMPLETE.json")
                        .read_text())
    out["lambda_saved"] = marker["trainer"]["mtp_weight"]
    out["consumed_saved"] = marker["trainer"]["consumed_tokens"]
    out["memory"] = _memory_snapshots(data, tmp)
    return out


def _memory_snapshots(data: Path, tmp: Path) -> dict:
    """train.memory_snapshot_steps: refused on the CPU; with the device allocator's recording
    stood in for (it exists on GPUs only), the history is written after the window's last step,
    and when a step runs out of memory."""
    import torch

    from model import accelerator
    from pretrain.config import ConfigError, config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    def cfg(name, steps):
        return config_from_dict(tiny_run(data, tmp / name, train={"memory_snapshot_steps": steps},
                                         checkpoint={"interval": 0, "save_at_exit": False}))

    out = {}
    try:
        Trainer(cfg("mem-cpu", 2))
    except ConfigError as err:
        out["cpu_error"] = str(err)
    calls = []
    real = {n: getattr(accelerator, n) for n in
            ("memory_history_supported", "record_memory_history", "dump_memory_history")}

    def dump(path):
        calls.append(("dump", Path(path).relative_to(tmp).as_posix(), trainer.step))
        Path(path).write_text("history")

    accelerator.memory_history_supported = lambda: True
    accelerator.record_memory_history = lambda enabled, max_entries=0: calls.append(
        ("record", enabled))
    accelerator.dump_memory_history = dump
    try:
        trainer = Trainer(cfg("mem", 2))
        trainer.train()
        out["window"] = list(calls)
        calls.clear()
        trainer = Trainer(cfg("mem-oom", 3))
        real_step = trainer.runner.train_step

        def step(*args):
            if trainer.step == 1:
                raise torch.OutOfMemoryError("injected")
            return real_step(*args)

        trainer.runner.train_step = step
        try:
            trainer.train()
        except torch.OutOfMemoryError as err:
            out["oom_error"] = str(err)
        out["oom"] = list(calls)
        out["cli"] = _out_of_memory_through_the_cli(data, tmp)
    finally:
        for name, fn in real.items():
            setattr(accelerator, name, fn)
    return out


def _out_of_memory_through_the_cli(data: Path, tmp: Path) -> tuple[int, str]:
    """`mtp train` whose second step runs out of memory: (exit code, stderr)."""
    import contextlib
    import io

    import torch
    import yaml

    from pretrain.cli import main
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    config = tmp / "oom.yaml"
    config.write_text(yaml.safe_dump(tiny_run(data, tmp / "mem-cli")))
    real_step = Trainer.train_step

    def step(self, *args):
        if self.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. If "
                                         "reserved but unallocated memory is large try ...")
        return real_step(self, *args)

    Trainer.train_step = step
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["train", "--config", str(config), "train.memory_snapshot_steps=3"])
    finally:
        Trainer.train_step = real_step
    return code, err.getvalue()


def shipped_configs(rank, world, data, tmp, names):
    """World 1: each shipped config, shrunk to a tiny shape on one process (its parallel layout
    is checked by the memory-plan test at its real size), trains two steps and checkpoints."""
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.trainer import Trainer
    from tests.train_fixtures import SEQ, VOCAB

    out = {}
    for name in names:
        run_dir = Path(tmp) / name
        cfg = load_config(f"configs/{name}.yaml", [
            f"run_dir={run_dir}", f"data.path={data}", f"model.vocab_size={VOCAB}",
            "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
            "model.num_kv_heads=2", "model.ffn_hidden_size=64", f"model.max_seq_len={SEQ}",
            "train.steps=2", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.precision=fp32", "train.log_interval=1", "train.eval_interval=2",
            "train.eval_batches=2", "data.num_workers=0", "mtp.depth=2", "checkpoint.interval=0",
            "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"])
        result = Trainer(cfg).train()
        out[name] = {"steps": [m["step"] for m in result.losses],
                     "ckpts": [r.step for r in ckpt.complete_checkpoints(run_dir / "checkpoints")],
                     "events": sorted(p.name[:20] for p in (run_dir / "tensorboard").iterdir()),
                     "config_written": (run_dir / "config.yaml").is_file()}
    return out


def acceptance_in_validation(rank, world, data, tmp):
    """World 2 (DP2): validation includes real draft acceptance, summed over DP ranks."""
    from pretrain.config import config_from_dict
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    cfg = config_from_dict(tiny_run(Path(data), Path(tmp) / "acc", train={
        "eval_interval": 3, "eval_batches": 2, "eval_acceptance_prompts": 3,
        "eval_acceptance_tokens": 6}))
    return Trainer(cfg).train().validation
