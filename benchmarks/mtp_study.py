"""The MTP study: does MTP pay at this scale, and how fast is self-speculative decoding?

    python benchmarks/mtp_study.py pack --out study-pack          # once, on a networked machine
    python benchmarks/mtp_study.py run ARM --data DATA --out STUDY [--ood-data DATA2] [--steps N]
    python benchmarks/mtp_study.py report STUDY --out docs/STUDY.md

`pack` writes a compressed, deterministic subset of the pinned Python-code corpus (files in a
seeded hash order until the archive reaches --max-mib) for offline GPU machines;
benchmarks/study_gpu.sh unpacks it there, builds the shards (and out-of-distribution shards
from the machine's own Python stdlib with the same tokenizer) and runs arms.

`run` trains one arm end to end in this process (same config, token budget, optimizer and seed
for every arm; only the MTP objective differs), exports it, evaluates the main head's held-out loss
(in-distribution: DATA's val split; out-of-distribution: DATA2's, tokenized with DATA's tokenizer),
per-depth teacher-forced accuracy, real draft acceptance and tokens per main-model forward, and
times plain vs self-speculative greedy decoding at batch 1. Everything lands in STUDY/ARM/result.json.
An arm is `none` or KIND DEPTH for any registered objective (`deepseek1`, `parallel4`, …), with
`-frozen` for objectives that can train on a frozen trunk: `blockwise4-frozen` trains BPD heads on
the frozen trunk of the finished `none` arm (STUDY/none).

`report` turns every STUDY/*/result.json into one Markdown page with the table, validation-loss
curves and acceptance-by-depth plots (PNG, needs matplotlib).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import provenance  # noqa: E402  (benchmarks/, the script's own folder)

ARMS = ("none", "deepseek1", "deepseek3", "parallel4", "blockwise4", "blockwise4-frozen")
"""The arms of docs/STUDY.md, in the report's order; any other `arm_overrides` accepts runs too."""
BASELINE = "none"
FROZEN = "freeze_trunk"  # the objective option that `-frozen` arms set


def arm_overrides(arm: str) -> list[str]:
    """Config overrides of an arm: `none`, or KIND DEPTH[-frozen] for a registered objective."""
    from model.mtp import objective_class, objective_kinds

    if arm == BASELINE:
        return ["mtp.kind=none", "mtp.depth=0"]
    match = re.fullmatch(r"(?P<kind>[A-Za-z_]\w*?)(?P<depth>\d+)(?P<frozen>-frozen)?", arm)
    if match is None or match["kind"] not in objective_kinds():
        raise SystemExit(f"mtp_study: arm {arm!r} is not 'none' or KIND DEPTH[-frozen] with KIND "
                         f"one of {objective_kinds()} (e.g. deepseek1, blockwise4-frozen)")
    out = [f"mtp.kind={match['kind']}", f"mtp.depth={match['depth']}"]
    if match["frozen"]:
        if FROZEN not in objective_class(match["kind"]).options:
            raise SystemExit(f"mtp_study: arm {arm!r}: objective {match['kind']!r} has no "
                             f"{FROZEN} option, so it cannot train on a frozen trunk")
        out.append(f"mtp.options.{FROZEN}=true")
    return out


def _cli(argv: list[str]) -> None:
    from pretrain.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(f"mtp_study: `mtp {' '.join(argv)}` failed with exit code {code}")


def run_arm(args: argparse.Namespace) -> dict:
    from data_pipeline import load_manifest
    from model import accelerator
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    arm_dir = args.out / args.arm
    arm_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"data.path={args.data}", f"run_dir={arm_dir / 'run'}",
                 f"train.steps={args.steps}", "checkpoint.interval=0",
                 f"train.eval_interval={max(1, args.steps // args.curve_points)}",
                 f"train.seed={args.seed}",
                 # Warm up over a tenth of the budget: the configs' 500 steps are sized for
                 # full-length runs and would leave a short study arm below its peak rate.
                 f"optim.warmup_steps={max(1, args.steps // 10)}", *arm_overrides(args.arm)]
    if args.arm.endswith("-frozen"):
        base = args.out / BASELINE / "export"
        if not (base / "config.json").is_file():
            raise SystemExit(f"mtp_study: arm {args.arm} trains on the frozen trunk of arm "
                             f"'{BASELINE}': run that arm first (no export at {base})")
        overrides.append(f"train.init_from={base}")
    cfg = load_config(str(args.config), overrides + list(args.overrides))
    # λ: 0.3 for the first 70 % of the token budget, then 0.1 (DeepSeek-V3's schedule, scaled).
    budget = cfg.train.steps * cfg.train.global_batch_size * load_manifest(args.data).seq_len
    overrides += ["mtp_weight.values=[0.3, 0.1]",
                  f"mtp_weight.boundaries_tokens=[{int(0.7 * budget)}]"]
    cfg = load_config(str(args.config), overrides + list(args.overrides))
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"mtp_study: training arm {args.arm} ended with exit code {result.exit_code}")

    export = arm_dir / "export"
    _cli(["export", str(arm_dir / "run"), "--out", str(export), "--overwrite"]
         + (["--with-mtp"] if cfg.mtp.kind != "none" else []))
    evals = {}
    for name, data in (("in_distribution", args.data), ("out_of_distribution", args.ood_data)):
        if data is None:
            continue
        out = arm_dir / f"eval-{name}.json"
        _cli(["eval", str(export), "--data", str(data), "--batches", str(args.eval_batches),
              "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.new_tokens), "--json", str(out)])
        evals[name] = json.loads(out.read_text())
    generation = None
    if cfg.mtp.kind != "none":
        out = arm_dir / "generation.json"
        # Batch 1, greedy, one engine: the first request (graph capture) apart, then one
        # request per further prompt (bench_generation.py measure).
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generation.py"),
                        "measure", str(export), "--data", str(args.data), "--batch-sizes", "1",
                        "--requests", str(max(1, args.prompts - 1)), "--prompt-len",
                        str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                        "--label", args.arm, "--json", str(out)], check=True, cwd=REPO)
        measured = json.loads(out.read_text())
        generation = next(iter(measured["models"].values()))["rows"][0]
    tps = [r["perf/tokens_per_s"] for r in result.losses[len(result.losses) // 4:]]
    res = {
        "arm": args.arm, "overrides": overrides + list(args.overrides), "config": str(args.config),
        "steps": cfg.train.steps, "tokens": budget, "seed": args.seed,
        "device": accelerator.device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": provenance.commit(), "train_seconds": train_seconds,
        "train_tokens_per_s": statistics.median(tps) if tps else None,
        "train_curve": [{k: v for k, v in r.items() if k == "step" or k.startswith("loss/")}
                        for r in result.losses],
        "validation_curve": [{k: v for k, v in r.items() if k.startswith(("step", "val/loss"))}
                             for r in result.validation],
        "eval": evals, "generation": generation,
    }
    (arm_dir / "result.json").write_text(json.dumps(res, indent=1))
    print(f"mtp_study: arm {args.arm} done: {arm_dir / 'result.json'}")
    return res




# ---------------------------------------------------------------------------------- pack
def pack(args: argparse.Namespace) -> dict:
    """corpus.tar.xz + pack.json in args.out: every .py file of the source in sha256(path)
    order (the distributions interleaved, deterministic) until the archive reaches the budget."""
    if args.source == "pinned-code":
        from data_pipeline import prepare_pinned_code

        root, _ = prepare_pinned_code(args.download_dir, progress=True)
    else:
        root = Path(args.source)
        if not root.is_dir():
            raise SystemExit(f"mtp_study: --source {root} is not a directory")
    files = sorted((p for p in root.rglob("*.py") if p.is_file()),
                   key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
    if not files:
        raise SystemExit(f"mtp_study: no .py files under {root}")
    args.out.mkdir(parents=True, exist_ok=True)
    archive = args.out / "corpus.tar.xz"
    # Stream tar → xz → file and stop adding files once the compressed output nears the budget
    # (what the compressor still holds back comes on top, hence the slack).
    stop_at = args.max_mib * 2**20 - 2**20
    kept, raw_bytes = 0, 0
    with open(archive, "wb") as fh, lzma.open(fh, "w", preset=args.preset) as xz, \
            tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            if fh.tell() > stop_at:
                break
            data = path.read_bytes()
            info = tarfile.TarInfo(str(path.relative_to(root)))
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
            kept += 1
            raw_bytes += len(data)
    packed = archive.stat().st_size
    meta = {"source": args.source, "root": str(root), "files_total": len(files),
            "files_kept": kept, "raw_bytes": raw_bytes, "compressed_bytes": packed,
            "order": "sha256 of the relative path", "xz_preset": args.preset,
            "commit": provenance.commit()}
    (args.out / "pack.json").write_text(json.dumps(meta, indent=1))
    print(f"mtp_study: packed {kept}/{len(files)} files ({raw_bytes / 2**20:.1f} MiB of source, "
          f"{packed / 2**20:.1f} MiB compressed) into {archive}")
    return meta


# ---------------------------------------------------------------------------------- report
def _fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def _row(r: dict) -> str:
    ev_id = r["eval"].get("in_distribution", {})
    ev_ood = r["eval"].get("out_of_distribution", {})
    acc = ev_id.get("acceptance")
    acc_ood = (ev_ood or {}).get("acceptance")
    gen = r["generation"] or {}
    depth_acc = " ".join(f"{a:.2f}" for a in ev_id.get("accuracy_per_depth", []))
    real = " ".join(f"{a:.2f}" for a in acc["acceptance_rate"]) if acc else "—"
    loss = ev_id.get("loss_per_depth", [None])[0]
    loss_ood = ev_ood.get("loss_per_depth", [None])[0] if ev_ood else None
    return (f"| {r['arm']} | {_fmt(loss)} | {_fmt(loss_ood)} | {depth_acc} | {real} | "
            f"{_tokens_per_forward(acc, acc_ood)} | "
            f"{_fmt(gen.get('plain', {}).get('tokens_per_s'), '.0f')} | "
            f"{_fmt(gen.get('speculative', {}).get('tokens_per_s'), '.0f')} | "
            f"{_speedup(gen)} | {_fmt(gen.get('round_cost'), '.2f')} | "
            f"{_fmt(r['train_tokens_per_s'], ',.0f')} |")


def _speedup(gen: dict) -> str:
    """Whole-request speed-up, and the steady-state one."""
    text = _fmt(gen.get("speedup"), ".2f")
    if gen.get("steady_speedup") is not None:
        text += f" (steady {gen['steady_speedup']:.2f})"
    return text


def _tokens_per_forward(*accs) -> str:
    if not any(accs):
        return "—"
    return " / ".join(_fmt(a and a["mean_tokens_per_forward"], ".2f") for a in accs)


def _plots(results: list[dict], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (train_ax, val_ax, diff_ax) = plt.subplots(1, 3, figsize=(15, 4))
    base = next((r for r in results if r["arm"] == BASELINE), None)
    base_val = {v["step"]: v["val/loss/main"] for v in (base or {}).get("validation_curve", [])
                if "val/loss/main" in v}
    for r in results:
        if _frozen(r):
            continue  # its main head is the baseline's final one: no curve of its own
        for ax, curve, key in ((train_ax, r["train_curve"], "loss/main"),
                               (val_ax, r["validation_curve"], "val/loss/main")):
            pts = [(v["step"], v[key]) for v in curve if key in v]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=r["arm"])
        # The arms' curves overlap at this scale; their gap to the baseline is what differs.
        diff = [(v["step"], v["val/loss/main"] - base_val[v["step"]])
                for v in r["validation_curve"] if v["step"] in base_val and "val/loss/main" in v]
        if diff:
            diff_ax.plot(*zip(*diff), marker="o", markersize=3, label=r["arm"])
    train_ax.set_ylabel("loss, main head (next token)")
    val_ax.sharey(train_ax)
    diff_ax.axhline(0, color="grey", linewidth=0.8)
    diff_ax.set_ylabel(f"held-out loss − {BASELINE}'s")
    for ax, title in ((train_ax, "training batches"), (val_ax, "held-out files"),
                      (diff_ax, f"held-out, against '{BASELINE}'")):
        ax.set_xlabel("step")
        ax.set_title(title)
    val_ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        acc = r["eval"].get("in_distribution", {}).get("acceptance")
        if acc:
            rates = acc["acceptance_rate"]
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=r["arm"])
    ax.set_xlabel("draft depth j")
    ax.set_xticks(range(1, max(len(r["eval"].get("in_distribution", {}).get("acceptance", {})
                                   .get("acceptance_rate", [0])) for r in results) + 1))
    ax.set_ylabel("rounds that accept drafts 1..j")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "acceptance_by_depth.png", dpi=120)
    plt.close(fig)
    return ["loss_curves.png", "acceptance_by_depth.png"]


def _frozen(r: dict) -> bool:
    return f"mtp.options.{FROZEN}=true" in r["overrides"] or f"mtp.{FROZEN}=true" in r["overrides"]


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_absolute() and p.is_relative_to(REPO) else path


def _common_overrides(results: list[dict]) -> list[str]:
    """Overrides every arm shares, less the per-run paths and the λ boundary (derived from the
    budget); the steps, seed, warm-up and evaluation cadence the study sets are kept."""
    common = set.intersection(*(set(r["overrides"]) for r in results))
    own = ("data.path=", "run_dir=", "mtp_weight.boundaries_tokens=")
    return [o for o in results[0]["overrides"] if o in common and not o.startswith(own)]


def report(args: argparse.Namespace) -> str:
    results = [json.loads(p.read_text()) for p in sorted(args.study.glob("*/result.json"))]
    if not results:
        raise SystemExit(f"mtp_study: no */result.json under {args.study}; run some arms first")
    order = list(ARMS)
    results.sort(key=lambda r: order.index(r["arm"]) if r["arm"] in order else len(order))
    out = Path(args.out)
    plot_dir = out.parent / (out.stem.lower() + "-plots")
    plots = _plots(results, plot_dir)
    first = results[0]
    lines = [
        "# MTP study: results",
        "",
        f"Produced by `benchmarks/mtp_study.py report` from {len(results)} arms. Card: "
        f"{', '.join(sorted({r['device'] for r in results}))}; dates: "
        f"{', '.join(sorted({r['date'][:10] for r in results}))}; commits: "
        f"{', '.join(sorted({r['commit'] or '?' for r in results}))}; config `{_rel(first['config'])}`, "
        f"{first['steps']} steps of {first['tokens'] // first['steps']:,} tokens, "
        f"{first['tokens']:,} training tokens per arm, seed {first['seed']}. Overrides common to "
        f"every arm: {', '.join(f'`{o}`' for o in _common_overrides(results)) or 'none'}.",
        "",
        "Held-out loss and acceptance: the arm's export on held-out files of the training corpus "
        "(out of distribution: the Python standard library); tokens / forward: mean tokens "
        "emitted per main-model forward in greedy self-speculative decoding; speed: batch 1, "
        "greedy, one decoding engine (graphs captured by a first request, not timed), whole "
        "requests (steady: tokens after the prefill over the device time of the steps); round "
        "cost: a replayed speculative round's device time in replayed plain steps (speed-up = "
        "tokens per forward ÷ round cost at steady state); training tok/s: median over the run, "
        "as trained here (arms "
        "shared the machine, see the reading for the benchmark's numbers). Real acceptance at depth "
        "j: the share of rounds in which drafts 1..j were all accepted. The loss-curve plot "
        "leaves out arms with a frozen trunk (their main head is the baseline's).",
        "",
        "| arm | held-out loss (main) | out-of-distribution loss | teacher-forced acc. per depth "
        "| real acceptance per depth | tokens / forward (in / out of distr.) | plain tok/s (batch 1) | speculative "
        "tok/s | speedup | round cost (plain steps) | training tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[_row(r) for r in results],
        "",
    ]
    lines += [f"![{p}]({plot_dir.name}/{p})" for p in plots] or [
        "(plots skipped: matplotlib is not installed)"]
    if args.reading:
        lines += ["", "## Reading", "", Path(args.reading).read_text().strip()]
    out.write_text("\n".join(lines) + "\n")
    print(f"mtp_study: wrote {out}" + (f" and {len(plots)} plots in {plot_dir}" if plots else ""))
    return out.read_text()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train, export and evaluate one arm")
    r.add_argument("arm", help="none, or KIND DEPTH[-frozen] for a registered MTP objective, "
                               f"e.g. {', '.join(ARMS[1:])}")
    r.add_argument("--data", type=Path, required=True, help="training dataset (mtp prepare)")
    r.add_argument("--ood-data", type=Path, help="out-of-distribution held-out dataset built "
                   "with the training data's tokenizer (mtp prepare --tokenizer)")
    r.add_argument("--out", type=Path, required=True, help="study directory (one folder per arm)")
    r.add_argument("--config", type=Path, default=REPO / "configs" / "gpt-110m.yaml")
    r.add_argument("--steps", type=int, default=2000, help="optimizer steps (same for every arm)")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--curve-points", type=int, default=5, help="validation passes during training")
    r.add_argument("--eval-batches", type=int, default=20)
    r.add_argument("--prompts", type=int, default=16,
                   help="held-out prompts for acceptance; speed: one request per prompt")
    r.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (held-out windows)")
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides")
    k = sub.add_parser("pack", help="a compressed corpus subset for offline GPU machines")
    k.add_argument("--out", type=Path, default=REPO / "study-pack")
    k.add_argument("--source", default="pinned-code", help="'pinned-code' or a directory")
    k.add_argument("--download-dir", type=Path, default=REPO / "data" / "downloads",
                   help="pinned-code download/extract cache")
    k.add_argument("--max-mib", type=float, default=40.0,
                   help="archive budget (what the GPU machine can be sent, wheels aside)")
    k.add_argument("--preset", type=int, default=1, choices=range(10), metavar="0-9",
                   help="xz preset: 1 packs Python source ~5.2× at ~19 MiB/s here, 6 ~6.5× at "
                        "~1.8 MiB/s")
    g = sub.add_parser("report", help="write the study page from the arms' result.json files")
    g.add_argument("study", type=Path)
    g.add_argument("--out", default=str(REPO / "docs" / "STUDY.md"))
    g.add_argument("--reading", help="a Markdown file with the written reading, appended")
    # KEY=VALUE overrides may follow options (argparse alone takes positionals only in one run).
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if args.cmd != "run" or a.startswith("-") or "=" not in a]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        {"run": run_arm, "pack": pack, "report": report}[args.cmd](args)
    finally:
        if args.cmd == "run":
            _destroy_process_group()


def _destroy_process_group() -> None:
    """The trainer's single-process group, so NCCL does not warn of a leak at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
