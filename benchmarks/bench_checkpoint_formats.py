"""Resuming on another layout: the project's layout-free checkpoint against DeepSpeed's universal
checkpoint, on the same model, the same trained state and the same machine.

    python benchmarks/bench_checkpoint_formats.py                    # 110m shape, DP 2 → DP 1
    python benchmarks/bench_checkpoint_formats.py --source tp2       # TP 2 → TP 1
    python benchmarks/bench_checkpoint_formats.py --shape small      # a CPU-sized model

A source run of two ranks (DP 2 with ZeRO-1, or TP 2) trains `--steps` steps and then writes both
formats from the same state:
  ours       the trainer's save (foreground): every rank's fp32 master and Adam fragments
             (pretrain/checkpoint_state.py);
  DeepSpeed  `engine.save_checkpoint`, its native files (the module's weights plus the ZeRO
             optimizer partitions), with the `universal_checkpoint_info` that the converter
             needs (for TP 2: which parameters are replicated, row-parallel, or two stacked
             sub-matrices, read off the parameters' megatron attributes).
Offline, each format's conversion runs as a command: `mtp checkpoint convert` (optional for us)
and DeepSpeed's `ds_to_universal` (required before a universal load). One rank on the target
layout (DP 1, TP 1) then loads both: ours through the trainer's resume (resharding while it
reads), DeepSpeed's through `engine.load_checkpoint` with `load_universal_checkpoint` set. The
two loaded states are compared parameter by parameter: the fp32 master and both Adam moments
where both loaded them (they must be equal), the moments one side did not load, and each
parameter's weight decay (its optimizer group's).

Times are wall-clock seconds; sizes are the bytes on disk. Results go to stdout (a Markdown table)
and to --json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # name: overrides of configs/gpt-110m.yaml (vocabulary of the prepared data: 32000)
    "110m": [],
    "small": ["model.num_layers=4", "model.hidden_size=512", "model.num_heads=8",
              "model.num_kv_heads=4", "model.ffn_hidden_size=1408"],
}
SOURCES = {"dp2": ["parallel.tp=1", "parallel.zero_stage=1"],
           "tp2": ["parallel.tp=2", "parallel.zero_stage=1"]}
TARGET = ["parallel.tp=1", "parallel.zero_stage=1"]
SEQ = 128  # the windows of the prepared data: the benchmark is about state, not activations
TAG = "ds"


def _config(args, run_dir: Path, layout: list[str]):
    from pretrain.config import load_config

    return load_config(str(REPO / "configs/gpt-110m.yaml"), [
        *SHAPES[args.shape], *layout, f"data.path={args.data}", f"run_dir={run_dir}",
        f"model.max_seq_len={SEQ}", "data.num_workers=0", f"train.steps={args.steps}",
        "train.micro_batch_size=1", "train.global_batch_size=2", "train.log_interval=1",
        "train.eval_interval=0", "train.compile=false", "optim.warmup_steps=0",
        "checkpoint.interval=0", "checkpoint.save_at_exit=true", "checkpoint.async_save=false"])


def _universal_info(module) -> dict:
    """What `ds_to_universal` must know to merge TP shards: exact-name patterns by how each
    parameter is split (megatron's attributes; everything unsplit is replicated)."""
    import re

    from deepspeed.checkpoint import constants as c

    replicated, row, stacked = [], [], []
    for name, p in module.named_parameters():
        pattern = f"^{re.escape(name)}$"
        if not getattr(p, "tensor_model_parallel", False):
            replicated.append(pattern)
        elif getattr(p, "partition_dim", 0) == 1:
            row.append(pattern)
        elif getattr(p, "partition_stride", 1) == 2:  # SwiGLU [gate; up], split each
            stacked.append(pattern)
    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row,
            c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: stacked}


def _barrier_time(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def source(args) -> None:
    """Rank function (torchrun, 2 ranks): train, then save both formats from the same state."""
    from pretrain.trainer import Trainer

    class TimedTrainer(Trainer):
        def save(self, final: bool = False):
            t0 = time.perf_counter()
            ref = super().save(final)
            self.save_seconds = time.perf_counter() - t0
            return ref

    work = Path(args.work)
    trainer = TimedTrainer(_config(args, work / "run", SOURCES[args.source]))
    trainer.train()  # the final save is ours, timed
    engine = trainer.engine
    ds_seconds = _barrier_time(lambda: engine.save_checkpoint(
        str(work / "deepspeed"), tag=TAG,
        client_state={"universal_checkpoint_info": _universal_info(engine.module)}))
    if trainer.rank == 0:
        print("RESULT " + json.dumps({"ours_save_s": trainer.save_seconds,
                                      "ds_save_s": ds_seconds}), flush=True)


def _full_state(trainer) -> tuple[dict, dict]:
    """({(name, field): whole tensor, or None where the optimizer holds no such state},
    {name: the weight decay of its optimizer group})."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.checkpoint_state import link_optimizer_state

    optimizer = trainer.engine.optimizer
    link_optimizer_state(optimizer)  # DeepSpeed links the moments lazily
    state, decay = {}, {}
    for name, p in trainer.engine.module.named_parameters():
        state[(name, "fp32")] = safe_get_full_fp32_param(p).detach().float().cpu()
        for field in ("exp_avg", "exp_avg_sq"):
            try:
                state[(name, field)] = safe_get_full_optimizer_state(p, field).detach().float().cpu()
            except (ValueError, TypeError):  # the group's moments were never loaded
                state[(name, field)] = None
    names = {id(p): n for n, p in trainer.engine.module.named_parameters()}
    for group, params in zip(optimizer.optimizer.param_groups, optimizer.bit16_groups):
        for p in params:
            decay[names[id(p)]] = group["weight_decay"]
    return state, decay


def target(args) -> None:
    """Rank function (1 rank): load ours (the trainer's resume) and DeepSpeed's universal
    checkpoint (engine.load_checkpoint) and compare what each loaded: values, moments present,
    and each parameter's weight decay."""
    from pretrain.checkpoint import complete_checkpoints
    from pretrain.trainer import Trainer

    work = Path(args.work)
    ref = complete_checkpoints(work / "run" / "checkpoints")[-1]
    label = "converted" if args.resume else "saved"
    ours = Trainer(_config(args, work / f"target-ours-{label}", TARGET),
                   resume=str(args.resume or ref.path))
    history = [json.loads(line) for line in
               (work / f"target-ours-{label}" / "history.jsonl").read_text().splitlines()]
    ours_load = [h for h in history if h.get("event") == "resume"][-1]["load_seconds"]

    theirs = Trainer(_config(args, work / f"target-ds-{label}", TARGET))
    engine = theirs.engine
    engine._config.load_universal_checkpoint = True  # what `checkpoint.load_universal` sets
    # The universal loader asks the model-parallel unit for megatron's `tensor_model_parallel`
    # names; ours (pretrain/distributed.py) has the ones DeepSpeed's engine itself uses.
    mpu = type(engine.optimizer.mpu)
    mpu.get_tensor_model_parallel_world_size = mpu.get_model_parallel_world_size
    mpu.get_tensor_model_parallel_rank = mpu.get_model_parallel_rank
    t0 = time.perf_counter()
    path, _ = engine.load_checkpoint(str(work / "deepspeed"), tag=f"{TAG}_universal",
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    ds_load = time.perf_counter() - t0
    assert path is not None, "DeepSpeed found no universal checkpoint to load"

    (a, decay_a), (b, decay_b) = _full_state(ours), _full_state(theirs)
    assert a.keys() == b.keys() and all(v is not None for v in a.values())
    present = [k for k in a if b[k] is not None]
    print("RESULT " + json.dumps({
        "ours_load_s": ours_load, "ds_load_s": ds_load,
        "max_abs_difference": max((a[k] - b[k]).abs().max().item() for k in present),
        "ds_values_differ": sorted({k[0] for k in present if not a[k].equal(b[k])}),
        "ds_moments_missing": sorted({k[0] for k in a if b[k] is None}),
        "ds_weight_decay_changed": sorted(n for n in decay_a if decay_a[n] != decay_b[n]),
        "parameters": sum(a[k].numel() for k in a if k[1] == "fp32"),
        "tensors": len(decay_a)}), flush=True)
    ours.close()
    theirs.close()


# ---------------------------------------------------------------------------------- driver
def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run(cmd: list[str], what: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(
            ln for ln in out.splitlines()[-60:] if ln.startswith(("[rank", "Traceback", " "))))
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return seconds, (json.loads(lines[-1][7:]) if lines else {})


def _strip_extra_state(ds_dir: Path) -> float:
    """Drop the `_extra_state` entries (None) of megatron-core's parallel linear layers from the
    native model files: `ds_to_universal` turns every module entry into a tensor and fails on
    them. Returns the seconds it took (part of DeepSpeed's conversion here)."""
    import torch

    t0 = time.perf_counter()
    for f in sorted(ds_dir.glob("mp_rank_*_model_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        state["module"] = {k: v for k, v in state["module"].items()
                           if not k.endswith("._extra_state")}
        torch.save(state, f)
    return time.perf_counter() - t0


def _torchrun(args, role: str, nproc: int, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(Path(__file__).resolve()), "--role", role,
           "--work", args.work, "--data", args.data, "--shape", args.shape, "--source",
           args.source, "--steps", str(args.steps), *extra]
    return _run(cmd, f"the {role} run")[1]


def _prepare(data: Path) -> None:
    if (data / "manifest.json").exists():
        return
    print(f"preparing {data} (mtp prepare --source stdlib) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pretrain", "prepare", "--source", "stdlib", "--out",
                    str(data), "--vocab-size", "32000", "--seq-len", str(SEQ), "--max-depth",
                    "4", "--tokenizer-sample-mb", "8", "--no-progress"], check=True, cwd=REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--shape", choices=sorted(SHAPES), default="110m",
                   help="configs/gpt-110m.yaml as shipped, or 'small' (4 layers of width 512) "
                        "for a quick run (default 110m)")
    p.add_argument("--source", choices=sorted(SOURCES), default="dp2",
                   help="the source run's layout (2 ranks); the target is DP 1")
    p.add_argument("--steps", type=int, default=2, help="training steps before the saves")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "bench-ckpt-data"),
                   help="prepared dataset (built from the stdlib on first use)")
    p.add_argument("--work", default=None,
                   help="where the checkpoints go, kept afterwards (default: a temporary "
                        "directory, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--role", choices=["source", "target"], help=argparse.SUPPRESS)
    p.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "source":
        return source(args)
    if args.role == "target":
        return target(args)
    _prepare(Path(args.data))
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        _compare(args)
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)


def _compare(args) -> None:
    from benchmarks.provenance import commit

    work = Path(args.work)
    print(f"{args.shape}, {args.source} → DP 1, checkpoints in {work}", flush=True)
    saved = _torchrun(args, "source", 2)
    ours_dir = next((work / "run" / "checkpoints").glob("step_*"))
    ds_dir = work / "deepspeed" / TAG
    convert_s, _ = _run([sys.executable, "-m", "pretrain", "checkpoint", "convert", str(ours_dir),
                         "--layout", "tp=1,pp=1,dp=1,zero=1", "--out", str(work / "converted"),
                         "--no-progress"], "mtp checkpoint convert")
    strip_s = _strip_extra_state(ds_dir)
    universal_s, _ = _run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(ds_dir), "--output_folder",
                           str(work / "deepspeed" / f"{TAG}_universal"), "--num_extract_workers",
                           "2", "--num_merge_workers", "1"], "ds_to_universal")
    # Both conversions are commands: what starting one costs (imports) is part of each figure.
    startup_s, _ = _run([sys.executable, "-c", "import deepspeed, megatron.core, safetensors"],
                        "importing the stack")
    loaded = _torchrun(args, "target", 1)
    converted = _torchrun(args, "target", 1, ["--resume", str(work / "converted")])
    res = {
        "shape": args.shape, "source": args.source, "commit": commit(),
        "date": time.strftime("%Y-%m-%d"), "parameters": loaded["parameters"],
        "command_startup_s": startup_s,
        "ours": {"save_s": saved["ours_save_s"], "bytes": _du(ours_dir), "convert_s": convert_s,
                 "load_s": loaded["ours_load_s"], "load_converted_s": converted["ours_load_s"]},
        "deepspeed": {"save_s": saved["ds_save_s"], "bytes": _du(ds_dir),
                      "convert_s": strip_s + universal_s, "load_s": loaded["ds_load_s"],
                      "universal_bytes": _du(work / "deepspeed" / f"{TAG}_universal")},
        "max_abs_difference": max(loaded["max_abs_difference"],
                                  converted["max_abs_difference"]),
        "deepspeed_values_differ": loaded["ds_values_differ"],
        "deepspeed_moments_missing": loaded["ds_moments_missing"],
        "deepspeed_weight_decay_changed": loaded["ds_weight_decay_changed"],
        "tensors": loaded["tensors"],
    }
    o, d = res["ours"], res["deepspeed"]
    print(f"\n{args.shape} ({res['parameters'] / 1e6:.0f}M parameters), {args.source} → DP 1; "
          f"where both loaded a value they differ by at most {res['max_abs_difference']:.1e}")
    lost, decay = res["deepspeed_moments_missing"], res["deepspeed_weight_decay_changed"]
    if res["deepspeed_values_differ"]:
        differ = res["deepspeed_values_differ"]
        print(f"DeepSpeed's universal load gave other values for {len(differ)} tensors "
              f"({', '.join(differ[:4])}, ...)")
    if lost or decay:
        print(f"DeepSpeed's universal load left {len(lost)} of {res['tensors']} tensors without "
              f"Adam moments ({', '.join(lost[:3])}, ...) and changed the weight decay of "
              f"{len(decay)} ({', '.join(decay[:3])}, ...)")
    print("| format | save (s) | on disk (GB) | offline conversion (s) | load on DP 1 (s) |")
    print("|---|---|---|---|---|")
    print(f"| ours | {o['save_s']:.2f} | {o['bytes'] / 1e9:.2f} | {o['convert_s']:.1f} (optional) "
          f"| {o['load_s']:.2f} as saved, {o['load_converted_s']:.2f} converted |")
    print(f"| DeepSpeed universal | {d['save_s']:.2f} | {d['bytes'] / 1e9:.2f} "
          f"(+{d['universal_bytes'] / 1e9:.2f} converted) | {d['convert_s']:.1f} (required) "
          f"| {d['load_s']:.2f} |")
    print(f"(each conversion includes {startup_s:.1f} s of starting Python and importing torch, "
          "DeepSpeed and megatron-core)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
