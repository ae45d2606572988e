"""Training throughput on GPUs: our pipeline side by side with plain compiled PyTorch and
megatron-core's GPTModel, same shape, same global batch, bf16, on the same card(s).

    python benchmarks/bench_training.py                       # everything, 1 GPU rows
    python benchmarks/bench_training.py --gpus 2              # plus the 2-GPU layouts
    python benchmarks/bench_training.py --rows ours-none,plain --shapes 110m
    python benchmarks/bench_training.py --rows ours-none,ours-none+model.loss_chunk_tokens=8192,plain

A row name may carry config overrides for our pipeline after `+` (ROW+key=value+key=value, values
without commas or `+`), to compare a setting against the same baseline in one run.

Every row runs in its own process (under torchrun for multi-GPU rows), so compile caches and peak
memory do not leak between rows. Our rows run the real `Trainer.train()` loop (DeepSpeed engine,
ZeRO, our shard loader on real shards, logging every step) and report the median of the per-step
tokens/s after the warm-up steps. The baselines (benchmarks/training_baselines.py) time their own
optimizer steps the same way. MFU = tokens/s × 3 × forward FLOPs per token / (GPUs × peak), with
forward FLOPs from the project's cost model, `model.cost.forward_flops_per_token` (all matmuls,
head and MTP tail included, attention scores over the full window) and the dense bf16 peak of the
card (`pretrain.metrics.PEAK_TFLOPS`: 989.4 TFLOP/s for H100/H200 SXM). Data: `mtp prepare
--source stdlib` shards, built on first use into --data.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # micro × accumulation = global batch (sequences); the same for every row of a shape. Micro
    # batches of 32k tokens: at 16k the per-micro-batch host work of our engine (Python-launched
    # kernels of 12-24 compiled blocks, DeepSpeed's per-parameter gradient hooks) exceeded the
    # GPU time on an H200 (profiled: GPU busy 67-75 %); --micro overrides.
    "110m": dict(config="configs/gpt-110m.yaml", layers=12, hidden=768, heads=12, kv_heads=12,
                 ffn=2048, seq=1024, vocab=32000, tie=True, micro=32, global_batch=64),
    "350m": dict(config="configs/gpt-350m.yaml", layers=24, hidden=1024, heads=16, kv_heads=4,
                 ffn=2816, seq=2048, vocab=32000, tie=False, micro=16, global_batch=32),
    # For the CPU smoke test of this script only.
    "tiny": dict(config="configs/tiny-cpu.yaml", layers=2, hidden=64, heads=4, kv_heads=2,
                 ffn=128, seq=16, vocab=512, tie=True, micro=2, global_batch=4),
}

# name: (kind, GPUs, our config overrides / baseline options)
ROWS = {
    "ours-none": ("ours", 1, ["mtp.kind=none", "mtp.depth=0"]),
    "ours-none-eager": ("ours", 1, ["mtp.kind=none", "mtp.depth=0", "train.compile=false"]),
    "ours-deepseek1": ("ours", 1, ["mtp.kind=deepseek", "mtp.depth=1"]),
    "ours-deepseek3": ("ours", 1, ["mtp.kind=deepseek", "mtp.depth=3"]),
    "ours-parallel4": ("ours", 1, ["mtp.kind=parallel", "mtp.depth=4"]),
    "ours-blockwise4": ("ours", 1, ["mtp.kind=blockwise", "mtp.depth=4"]),
    "plain": ("plain", 1, []),
    "megatron-mtp0": ("megatron", 1, [0]),
    "megatron-mtp1": ("megatron", 1, [1]),
    "ours-none-dp2-zero1": ("ours", 2, ["mtp.kind=none", "mtp.depth=0"]),
    "ours-none-dp2-zero2": ("ours", 2, ["mtp.kind=none", "mtp.depth=0", "parallel.zero_stage=2"]),
    "ours-none-tp2": ("ours", 2, ["mtp.kind=none", "mtp.depth=0", "parallel.tp=2"]),
    "ours-none-pp2": ("ours", 2, ["mtp.kind=none", "mtp.depth=0", "parallel.pp=2"]),
    "ours-deepseek1-pp2dp2": ("ours", 4, ["parallel.pp=2"]),
    "ours-deepseek1-tp2pp2": ("ours", 4, ["parallel.tp=2", "parallel.pp=2"]),
}
DEFAULT_SHAPE_ROWS = {
    "110m": [r for r in ROWS if r.startswith(("ours", "plain", "megatron"))],
    "350m": ["ours-none", "ours-deepseek1", "plain", "megatron-mtp0"],
    "tiny": ["ours-none", "ours-deepseek1", "plain"],
}


def _row(row: str) -> tuple[str, int, list]:
    """(kind, GPUs, options) of `row`: a ROWS name, for our rows optionally followed by config
    overrides, `ROW+key=value+...`."""
    base, *extra = row.split("+")
    if base not in ROWS:
        raise SystemExit(f"unknown row {base!r} (in {row!r}); rows: {', '.join(ROWS)}")
    kind, gpus, opts = ROWS[base]
    if extra and kind != "ours":
        raise SystemExit(f"row {row!r}: +key=value overrides apply to our rows only")
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise SystemExit(f"row {row!r}: {bad[0]!r} is not a key=value config override")
    return kind, gpus, [*opts, *extra]


def _decoder_config(shape: dict, kind: str, depth: int):
    from model import DecoderConfig, ModelConfig, MTPConfig

    return DecoderConfig(
        ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                    num_layers=shape["layers"], num_heads=shape["heads"],
                    num_kv_heads=shape["kv_heads"], ffn_hidden_size=shape["ffn"],
                    max_seq_len=shape["seq"]),
        MTPConfig(kind=kind, depth=depth))


def _train_flops_per_token(shape: dict, kind: str, depth: int) -> float:
    from model.cost import forward_flops_per_token

    f = forward_flops_per_token(_decoder_config(shape, kind, depth), shape["seq"])
    return 3 * (f["main"] + f["mtp"])


def _result(tokens_per_s: list[float], flops_per_token: float, gpus: int,
            peak_bytes: int | None, **extra) -> dict:
    from pretrain.metrics import PEAK_TFLOPS

    tps = statistics.median(tokens_per_s)
    peak = PEAK_TFLOPS["H200"]  # H100 and H200 SXM alike
    return {"tokens_per_s": tps, "mfu": tps * flops_per_token / (gpus * peak * 1e12),
            "peak_gib": None if peak_bytes is None else peak_bytes / 2**30, "timed_steps": len(tokens_per_s), **extra}


# ---------------------------------------------------------------------------------- workers
def _worker_ours(shape: dict, overrides: list[str], data: Path, steps: int, warmup: int,
                 gpus: int, profile: Path | None, run_dir: Path,
                 host_profile: Path | None = None) -> dict | None:
    from model import accelerator
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    shape_overrides = [
        f"model.{k}={shape[v]}" for k, v in (
            ("vocab_size", "vocab"), ("hidden_size", "hidden"), ("num_layers", "layers"),
            ("num_heads", "heads"), ("num_kv_heads", "kv_heads"), ("ffn_hidden_size", "ffn"),
            ("max_seq_len", "seq"), ("tie_embeddings", "tie"))]
    cfg = load_config(str(REPO / shape["config"]), [
        *shape_overrides, f"data.path={data}", f"run_dir={run_dir}", f"train.steps={warmup + steps}",
        "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=0",
        "checkpoint.save_at_exit=false", f"train.micro_batch_size={shape['micro']}",
        f"train.global_batch_size={shape['global_batch']}", "optim.warmup_steps=0",
        *overrides])
    trainer = Trainer(cfg)
    if profile is not None:
        _profile_steps(trainer, profile, warmup)
    if host_profile is not None:
        _profile_host(trainer, host_profile, warmup)
    result = trainer.train()
    if trainer.rank != 0:
        return None
    timed = [r for r in result.losses if r["step"] > warmup]
    return _result([r["perf/tokens_per_s"] for r in timed],
                   trainer.train_flops_per_token, gpus,
                   _peak_bytes([r["memory/peak_gib"] for r in timed]),
                   compiled=trainer.policy.compile, device=accelerator.device_name())


def _peak_bytes(peaks_gib: list[float | None]) -> int | None:
    known = [p for p in peaks_gib if p is not None]
    return int(max(known) * 2**30) if known else None  # None on CPU


def _warmed_up(trainer, warmup: int):
    """The trainer's batch iterator after `warmup` optimizer steps (compilation done, device idle)."""
    from model import accelerator

    it = iter(trainer.train_loader) if trainer.train_loader is not None else None
    for _ in range(warmup):
        trainer.train_step(it, 0.1)
    accelerator.synchronize()
    return it


def _profile_steps(trainer, out: Path, warmup: int) -> None:
    """Warm up, then profile two optimizer steps; writes the top kernels/ops by GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model import accelerator

    it = _warmed_up(trainer, warmup)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            trainer.train_step(it, 0.1)
        accelerator.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    if trainer.rank == 0:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45,
                                          max_name_column_width=70)
        cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25,
                                        max_name_column_width=70)
        out.write_text(f"# 2 optimizer steps\n\n{_kernel_summary(prof, wall_ms)}\n\n"
                       f"## by GPU time\n{table}\n\n## by CPU time\n{cpu}\n")
    del torch


KERNEL_KINDS = (  # first match wins; names of cuBLAS/CUTLASS, FlashAttention, Inductor kernels
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("attention", ("flash", "fmha", "attention")),
    ("compiled (Inductor)", ("triton_",)),
    ("communication", ("nccl",)),
    ("memcpy/memset", ("memcpy", "memset")),
)


def _kernel_summary(prof, wall_ms: float) -> str:
    """GPU kernel time of the profiled steps by kind, against their wall time."""
    from torch.autograd import DeviceType

    kinds: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != DeviceType.CUDA:
            continue
        name = ev.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name for x in keys)),
                    "other (eager elementwise, reductions, ...)")
        kinds.setdefault(kind, []).append(ev.device_time_total / 1e3)
    busy = sum(sum(v) for v in kinds.values())
    lines = [f"wall {wall_ms:.1f} ms; GPU kernels {busy:.1f} ms ({busy / wall_ms:.0%} busy)",
             "", "| kernels | count | ms | share |", "|---|---|---|---|"]
    for kind, times in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {kind} | {len(times)} | {sum(times):.1f} | {sum(times) / busy:.0%} |")
    return "\n".join(lines)


def _profile_host(trainer, out: Path, warmup: int) -> None:
    """Warm up, then write where the host spends a step: cProfile of four optimizer steps
    (Python functions by own and cumulative time) and every distinct call stack that made the
    host wait for the GPU (sync debug mode) in two more."""
    import cProfile
    import io
    import pstats
    import traceback
    import warnings

    from model import accelerator

    it = _warmed_up(trainer, warmup)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(4):
        trainer.train_step(it, 0.1)
    prof.disable()
    host_s = time.perf_counter() - t0
    accelerator.synchronize()
    total_s = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    for key in ("tottime", "cumulative"):
        text.write(f"\n## by {key}\n")
        stats.sort_stats(key).print_stats(45)
    syncs: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # "called a synchronizing CUDA operation"
            return  # another library's warning
        stack = "".join(traceback.format_stack()[:-2][-8:])
        syncs[stack] = syncs.get(stack, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        accelerator.report_host_syncs(True)
        try:
            for _ in range(2):
                trainer.train_step(it, 0.1)
        finally:
            accelerator.report_host_syncs(False)
    if trainer.rank == 0:
        sync_text = "".join(f"\n### {n}× in 2 steps\n{stack}" for stack, n in
                            sorted(syncs.items(), key=lambda kv: -kv[1]))
        out.write_text(f"# host profile: 4 optimizer steps, {host_s * 1e3:.0f} ms on the host "
                       f"under cProfile, {total_s * 1e3:.0f} ms until the GPU finished\n"
                       f"{text.getvalue()}\n## host syncs ({len(syncs)} call sites)\n{sync_text}")


def _timed_loop(step_fn, steps: int, warmup: int, tokens_per_step: int) -> list[float]:
    from model import accelerator

    rates = []
    for i in range(warmup + steps):
        accelerator.synchronize()
        t0 = time.perf_counter()
        step_fn()
        accelerator.synchronize()
        if i >= warmup:
            rates.append(tokens_per_step / (time.perf_counter() - t0))
    return rates


def _random_batches(shape: dict, count: int = 8):
    import torch

    from model import accelerator

    g = torch.Generator().manual_seed(0)
    dev = accelerator.current_device()
    return [torch.randint(0, shape["vocab"], (shape["micro"], shape["seq"] + 1), generator=g).to(dev)
            for _ in range(count)]


def _torch_loop(shape: dict, model, micro_loss, steps: int, warmup: int, kind: str,
                depth: int) -> dict:
    """Times the optimizer steps of a baseline's plain torch loop: bf16 autocast, gradient
    accumulation to the shape's global batch, clipping at 1.0, fused AdamW. `micro_loss(batch)`
    is one micro-batch's mean loss; batch [micro, seq + 1] token ids."""
    import torch

    from model import accelerator

    dev = accelerator.current_device()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=dev.type != "cpu")
    batches = _random_batches(shape)
    accum = shape["global_batch"] // shape["micro"]
    counter = iter(range(10**9))

    def step():
        for _ in range(accum):
            b = batches[next(counter) % len(batches)]
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = micro_loss(b) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    accelerator.reset_peak_memory()
    rates = _timed_loop(step, steps, warmup, shape["global_batch"] * shape["seq"])
    return _result(rates, _train_flops_per_token(shape, kind, depth), 1,
                   accelerator.peak_memory_bytes(), device=accelerator.device_name())


def _worker_plain(shape: dict, steps: int, warmup: int) -> dict:
    import torch

    from benchmarks.training_baselines import PlainGPT
    from model import accelerator

    torch.manual_seed(0)
    model = PlainGPT(shape).to(accelerator.current_device())
    compiled = torch.compile(model)
    return _torch_loop(shape, model, lambda b: compiled(b[:, :-1], b[:, 1:]), steps, warmup,
                       "none", 0)


def _worker_megatron(shape: dict, mtp_layers: int, steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist

    from benchmarks.training_baselines import megatron_gpt
    from model import accelerator
    from pretrain.launch import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(accelerator.communication_backend(), rank=0, world_size=1)
    dev = accelerator.current_device()
    model = megatron_gpt(shape, mtp_layers)
    pos = torch.arange(shape["seq"], device=dev).expand(shape["micro"], -1)
    mask = torch.ones(shape["micro"], shape["seq"], device=dev)

    def micro_loss(b):
        # GPTModel returns per-token losses (the MTP loss is added through its autograd hook).
        return model(b[:, :-1], pos, None, labels=b[:, 1:], loss_mask=mask).float().mean()

    kind, depth = ("deepseek", 1) if mtp_layers else ("none", 0)
    return _torch_loop(shape, model, micro_loss, steps, warmup, kind, depth)


def _shape(args: argparse.Namespace, name: str) -> dict:
    shape = dict(SHAPES[name])
    if args.micro:
        shape["micro"] = args.micro
    return shape


def worker(args: argparse.Namespace) -> None:
    shape = _shape(args, args.shape)
    kind, gpus, opts = _row(args.row)
    profile = Path(args.profile) if args.profile else None
    host_profile = Path(args.host_profile) if args.host_profile else None
    if kind == "ours":
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.row)
        run_dir = Path(tempfile.gettempdir()) / f"bench-training-{args.shape}-{tag}"
        res = _worker_ours(shape, opts, _data_dir(Path(args.data), shape), args.steps,
                           args.warmup, gpus, profile, run_dir, host_profile)
    elif kind == "plain":
        res = _worker_plain(shape, args.steps, args.warmup)
    else:
        res = _worker_megatron(shape, opts[0], args.steps, args.warmup)
    if res is not None:
        print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------- driver
def _data_dir(root: Path, shape: dict) -> Path:
    return root / f"stdlib-seq{shape['seq']}"


def _prepare(root: Path, shape: dict) -> None:
    out = _data_dir(root, shape)
    if (out / "manifest.json").exists():
        return
    print(f"preparing {out} (mtp prepare --source stdlib) ...", flush=True)
    cmd = [sys.executable, "-m", "pretrain", "prepare", "--source", "stdlib", "--out", str(out),
           "--vocab-size", str(shape["vocab"]), "--seq-len", str(shape["seq"]), "--max-depth",
           "4", "--no-progress"]
    # Another window length of the same corpus: reuse its tokenizer instead of training one.
    same_vocab = [t for t in sorted(root.glob("stdlib-seq*/tokenizer.model"))
                  if (t.parent / "manifest.json").exists() and json.loads((t.parent / "manifest.json").read_text())["vocab_size"]
                  == shape["vocab"]]
    if same_vocab:
        cmd += ["--tokenizer", str(same_vocab[0])]
    subprocess.run(cmd, check=True, cwd=REPO)


def _run_row(args, shape_name: str, row: str, profile: str | None,
             gpu: int | None = None, host_profile: str | None = None) -> dict:
    _, gpus, _ = _row(row)
    cmd = [str(Path(__file__).resolve()), "--worker", "--shape", shape_name, "--row", row,
           "--data", str(args.data), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.micro:
        cmd += ["--micro", str(args.micro)]
    if profile:
        cmd += ["--profile", profile]
    if host_profile:
        cmd += ["--host-profile", host_profile]
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={gpus}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = dict(os.environ)
    if gpu is not None:  # a single-GPU row running beside others
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout,
                              cwd=REPO, env=env)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = f"timed out after {args.row_timeout} s\n" + (err.stdout or b"").decode(errors="replace")[-3000:]
        proc = None
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        (Path(args.logs) / f"{shape_name}-{row}.log").write_text(out)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc is None or proc.returncode != 0 or not lines:
        tail = "\n".join(out.strip().splitlines()[-6:])
        print(f"  {shape_name} {row}: FAILED\n{tail}", flush=True)
        return {"error": tail.splitlines()[-1] if tail else "no output"}
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.monotonic() - t0
    print(f"  {shape_name} {row}: {res['tokens_per_s']:,.0f} tokens/s, MFU {res['mfu']:.1%}, "
          f"peak {_gib(res['peak_gib'])} GiB ({res['wall_s']:.0f} s)", flush=True)
    return res


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def table(results: dict) -> str:
    lines = ["| shape | row | GPUs | tokens/s | MFU | peak GiB/GPU | × plain | × megatron mtp0 | scaling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape_name, rows in results.items():
        plain = rows.get("plain", {}).get("tokens_per_s")
        mega = rows.get("megatron-mtp0", {}).get("tokens_per_s")
        single = rows.get("ours-none", {}).get("tokens_per_s")
        for row, r in rows.items():
            gpus = _row(row)[1]
            if "error" in r:
                lines.append(f"| {shape_name} | {row} | {gpus} | failed: {r['error'][:80]} | | | | | |")
                continue
            tps = r["tokens_per_s"]

            def ratio(base, tps=tps):
                return f"{tps / base:.2f}" if base else "—"

            scaling = (f"{tps / (gpus * single):.2f}" if gpus > 1 and single
                       and row.startswith("ours-none") else "—")
            lines.append(
                f"| {shape_name} | {row} | {gpus} | {tps:,.0f} | {r['mfu']:.1%} | "
                f"{_gib(r['peak_gib'])} | {ratio(plain)} | {ratio(mega)} | {scaling} |")
    return "\n".join(lines)


def _run_shape(args, shape_name: str, rows: list[str], results: dict,
               profiles: dict[str, tuple[str, str]]) -> dict:
    out = results[shape_name] = dict.fromkeys(rows)
    saving = threading.Lock()  # rows that finish together (--concurrent) write the file in turn

    def run(row, gpu=None):
        def target(option):
            where, file = profiles.get(option, (None, None))
            return file if where == f"{shape_name}:{row}" else None

        result = _run_row(args, shape_name, row, target("profile"), gpu, target("host_profile"))
        with saving:
            out[row] = result
            if args.json:  # replaced whole, so a reader never sees half a file
                tmp = Path(f"{args.json}.tmp")
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, args.json)

    single = [r for r in rows if _row(r)[1] == 1]
    if args.concurrent > 1:
        # One single-GPU row per GPU at a time (each process sees one card).
        free: queue.Queue[int] = queue.Queue()
        for gpu in range(min(args.concurrent, args.gpus)):
            free.put(gpu)

        def on_free_gpu(row):
            gpu = free.get()
            try:
                run(row, gpu)
            finally:
                free.put(gpu)

        with ThreadPoolExecutor(max_workers=free.qsize()) as pool:
            list(pool.map(on_free_gpu, single))
    else:
        for row in single:
            run(row)
    for row in rows:  # multi-GPU rows, one at a time on all their cards
        if _row(row)[1] > 1:
            run(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows: " + ", ".join(ROWS))
    p.add_argument("--shapes", default="110m,350m", help="comma-separated: 110m, 350m (tiny: "
                   "a toy shape for smoke tests)")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows (default: the 1-GPU rows per shape, plus the "
                        "multi-GPU rows that fit --gpus for 110m); ROW+key=value adds a config "
                        "override to one of our rows")
    p.add_argument("--gpus", type=int, default=1, help="GPUs available for multi-GPU rows")
    p.add_argument("--data", type=Path, default=REPO / "bench-data",
                   help="where the stdlib shards live (built on first use)")
    p.add_argument("--concurrent", type=int, default=1,
                   help="run up to this many single-GPU rows at once, one per GPU (of --gpus); "
                        "shortens the run, adds some host-side noise")
    p.add_argument("--micro", type=int, default=0,
                   help="micro-batch size (sequences) for every row instead of the shape's")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps (compilation)")
    p.add_argument("--row-timeout", type=int, default=300, help="seconds before a row is failed")
    p.add_argument("--profile", default=None, metavar="SHAPE:ROW=FILE",
                   help="also write a torch.profiler summary of two steps of this row")
    p.add_argument("--host-profile", default=None, metavar="SHAPE:ROW=FILE",
                   help="also write where the host spends this (our) row's steps: cProfile of "
                        "four steps and the call stacks that wait for the GPU")
    p.add_argument("--logs", default=None, help="directory for each row's full output")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from model import accelerator

    if accelerator.is_cpu() and args.shapes != "tiny":
        sys.exit("bench_training.py needs a GPU (bf16, torch.compile, NCCL); on CPU only the "
                 "smoke-test shape runs: --shapes tiny")
    profiles = {}
    for option in ("profile", "host_profile"):
        value = getattr(args, option)
        if value is not None:
            if "=" not in value or ":" not in value.split("=", 1)[0]:
                sys.exit(f"--{option.replace('_', '-')} {value!r}: expected SHAPE:ROW=FILE, "
                         "e.g. 110m:ours-none=/tmp/profile.txt")
            profiles[option] = tuple(value.rsplit("=", 1))  # a row may hold "=" itself
    results: dict[str, dict] = {}
    for shape_name in args.shapes.split(","):
        shape = _shape(args, shape_name)
        rows = (args.rows.split(",") if args.rows else DEFAULT_SHAPE_ROWS[shape_name])
        rows = [r for r in rows if _row(r)[1] <= args.gpus]
        if any(_row(r)[0] == "ours" for r in rows):
            _prepare(args.data, shape)
        results[shape_name] = _run_shape(args, shape_name, rows, results, profiles)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
