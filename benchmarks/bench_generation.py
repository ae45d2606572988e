"""Decoding speed of the decoding engine: plain vs self-speculative greedy decoding on held-out
prompts, request after request on one engine.

    python benchmarks/bench_generation.py suite --out OUT [--work DIR] [--shapes 110m,350m]
        [--gpus 2] [--tp2] [--profile]
    python benchmarks/bench_generation.py measure MODEL --data DATA [--mtp-depths 1,3] [--json F]
    python benchmarks/bench_generation.py draft-cost --data DATA [--draft-vocab 1024,4096]

`suite` is the whole GPU measurement with no network and no trained model at hand: shards from
this interpreter's standard library (`mtp prepare --source stdlib`, 2 % of files held out; or
`--source DIR`, or a prepared `--data`), one DeepSeek model per shape and trained depth
(`--train-depths`, default 3; `--train-steps` steps of `--global-batch` windows, `mtp train`
with the shape's config and the MTP study's λ schedule), exported with its tail, then
`measure`d at its depth — and a D=3 model also as D=1 where no D=1 model is trained: the same
main model with only the first MTP module (a DeepSeek module k reads module k-1's output, so
module 1 alone is a complete D=1 drafter; it was trained with weight λ/3 instead of λ, so its
acceptance is somewhat below a D=1-trained model's). The models are real, trained on real code,
and the prompts are held-out files: acceptance and speed-ups are genuine. The study's models
(600 steps of 64 windows of the pinned code corpus): benchmarks/gpu_decoding_session.sh.
`--gpus 2` runs the shapes side by side, one per GPU; `--tp2` adds a TP = 2 row (both GPUs),
`--tp2-only` trains the first shape and measures only that row. Only results and logs go to
--out (at most 8 files); data, runs and exports go to --work.

`measure` times one model. Per batch size and decoding mode: the first request alone (it
captures the engine's device graphs, and compiles the decoding regions where nothing compiled
them yet), then `--requests` more requests of distinct prompts (whole-request tokens/s, from
the call to the tokens on the host), their steady state (tokens after the first of each
sequence over the device time from the end of the prefill to the last step) and their prefill.
`round cost` is the device time of one replayed speculative round in replayed plain steps (each
replayed 200 times back to back after the requests): speculative decoding's steady speed-up is
tokens per round ÷ round cost whatever the acceptance, so rows also give the speed-up that the
study models' acceptance would give (τ = 1.91 for D=1, 3.68 for D=3, docs/STUDY.md), labelled
as projected. `--profile` adds, at batch 1, the device kernels of each phase of a step and a
round (counts and µs; one eager request per mode under torch.profiler) and the device timeline
of 20 replayed steps and rounds: operations, busy µs and span µs per replay (span − busy is
the device waiting between kernels: launch gaps inside the graph). `--draft-tokens 3,4,5`
measures one engine per count of drafts a round (rows named `N=`; beyond the depth the last
DeepSeek module is chained): a deeper draft pays when its acceptance buys more tokens a round
than its module and the wider verification add to the round.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import provenance  # noqa: E402  (benchmarks/, the script's own folder)

STUDY_TOKENS_PER_ROUND = {1: 1.91, 3: 3.68}
"""Tokens per main-model forward of the MTP study's models (gpt-110m, 600 steps, pinned code,
held-out prompts; docs/STUDY.md): what the projected speed-ups assume."""

SHAPES = {
    # Training of the suite's model: micro × accumulation = global batch of seq-1024 windows.
    "110m": dict(config="configs/gpt-110m.yaml", micro=32, global_batch=32, seq=1024),
    "350m": dict(config="configs/gpt-350m.yaml", micro=16, global_batch=32, seq=1024),
    # The CPU smoke test of this script only.
    "tiny": dict(config="configs/tiny-cpu.yaml", micro=4, global_batch=4, seq=64,
                 overrides=["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2",
                            "model.num_heads=4", "model.num_kv_heads=2",
                            "model.ffn_hidden_size=64", "model.max_seq_len=64",
                            "train.precision=fp32"]),
}

PHASES = ("decode.prefill", "decode.main", "decode.commit", "decode.draft")


# ---------------------------------------------------------------------------------- measure
def held_out_prompts(data: Path, prompt_len: int, count: int) -> list[list[int]]:
    """`count` prompts of `prompt_len` tokens: consecutive chunks of the validation windows
    (held-out files), in order; fewer if the split is smaller."""
    from pretrain.config import DataConfig
    from pretrain.data_loading import make_loader

    loader = make_loader(DataConfig(path=str(data), num_workers=0), "prompts", dp_rank=0,
                         dp_size=1, batch_size=8, seed=0, depth=0, shuffle=False)
    prompts: list[list[int]] = []
    for batch in loader:
        for row in batch["input_ids"].tolist():
            prompts += [row[i : i + prompt_len]
                        for i in range(0, len(row) - prompt_len + 1, prompt_len)]
        if len(prompts) >= count:
            break
    return prompts[:count]


def _replay_seconds(engine, n: int) -> float:
    """Device seconds per replay of the engine's last steady-state step (plain step or
    speculative round), replayed `n` times back to back."""
    from model import accelerator

    clock = accelerator.DeviceClock()
    engine.last_step()  # warm
    start = clock.mark()
    for _ in range(n):
        engine.last_step()
    return clock.seconds(start, clock.mark()) / n


DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def replay_timeline(events: list[dict], replays: int, top: int = 8) -> dict:
    """What the device did during `replays` back-to-back replays, from a profiler trace's
    device events (chrome-trace dicts with cat, name, ts and dur in µs): per replay, the device
    operations, the µs they kept the device busy and the span from the first start to the last
    end (span − busy: the device idle between them, launch gaps), and the `top` operations by
    busy µs per replay."""
    ops = [e for e in events if e.get("cat") in DEVICE_EVENTS and "dur" in e]
    if not ops:
        return {}
    busy = sum(e["dur"] for e in ops)
    span = max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)
    by_name: dict[str, float] = {}
    for e in ops:
        by_name[e["name"][:80]] = by_name.get(e["name"][:80], 0.0) + e["dur"]
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return dict(ops=len(ops) / replays, busy_us=busy / replays, span_us=span / replays,
                top=[(name, us / replays) for name, us in heaviest])


def _replay_profile(engine, n: int) -> dict:
    """`replay_timeline` of the engine's last steady-state step replayed `n` times (GPUs; {} on
    the CPU, which has no device events)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from model import accelerator

    if accelerator.is_cpu():
        return {}
    engine.last_step()  # warm
    accelerator.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            engine.last_step()
        accelerator.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return replay_timeline(events, n)


def _phase_profile(model, prompts, new_tokens, compile_: bool, draft_vocab=None,
                   draft_tokens=None) -> dict:
    """What each decoding phase is made of, per call: device kernels (count, µs) on GPUs, leaf
    operators (count, CPU µs) on the CPU — one plain and one speculative request at batch 1,
    run eagerly (graphs off) with the same compiled regions as the measured engine."""
    from torch.profiler import ProfilerActivity, profile

    from model import accelerator
    from model.generation import DecodingEngine

    gpu = not accelerator.is_cpu()
    engine = DecodingEngine(model, graphs=False, compile=compile_, draft_vocab=draft_vocab,
                            draft_tokens=draft_tokens)
    out = {}
    for name, speculative in (("plain", False), ("speculative", True)):
        engine.generate(prompts, new_tokens, speculative=speculative)  # warm
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            engine.generate(prompts, new_tokens, speculative=speculative)
        phases = {}
        for ev in prof.events():
            if ev.name not in PHASES:
                continue
            count, micros, stack = 0, 0.0, list(ev.cpu_children)
            while stack:
                child = stack.pop()
                if gpu:
                    count += len(child.kernels)
                    micros += sum(k.duration for k in child.kernels)
                elif not child.cpu_children:
                    count += 1
                    micros += child.self_cpu_time_total
                stack += child.cpu_children
            p = phases.setdefault(ev.name, {"calls": 0, "kernels": 0, "device_us": 0.0})
            p["calls"] += 1
            p["kernels"] += count
            p["device_us"] += micros
        for p in phases.values():  # per call: a prefill per request, the others per step
            p["kernels"] /= p["calls"]
            p["device_us"] /= p["calls"]
        out[name] = {"unit": "kernels" if gpu else "cpu operators", "phases": phases}
    return out


def _mode_stats(first, results, replay_s: float) -> dict:
    tokens = sum(r.num_tokens for r in results)
    seconds = sum(r.seconds for r in results)
    steady_tokens = sum(r.num_tokens - len(r.tokens) for r in results)  # the prefill's excluded
    decode_s = sum(r.decode_seconds for r in results)
    return dict(
        tokens_per_s=tokens / seconds, request_ms=1e3 * seconds / len(results),
        steady_tokens_per_s=steady_tokens / decode_s if decode_s else None,
        prefill_ms=1e3 * statistics.mean(r.prefill_seconds for r in results),
        first_request_ms=1e3 * first.seconds, graphs_captured=first.captured,
        later_graphs_captured=sum(r.captured for r in results),
        steps_per_request=statistics.mean(r.steps for r in results),
        step_us=1e6 * replay_s)


def measure_model(model, prompts: list[list[int]], batch_sizes: list[int], requests: int,
                  new_tokens: int, graphs: bool | None, compile_: bool | None, depth: int,
                  replays: int, log, draft_vocab=None, profile: bool = False,
                  draft_tokens: int | None = None) -> list[dict]:
    """Rows (one per batch size) for one model on one engine (drafting over `draft_vocab`'s
    token ids only, when given; `draft_tokens` drafts a round, None: the depth); `profile`: the
    replay timeline of batch 1's steps too."""
    from model.generation import DecodingEngine, SpeculativeStats

    engine = DecodingEngine(model, graphs=graphs, compile=compile_, draft_vocab=draft_vocab,
                            draft_tokens=draft_tokens)
    drafts = engine.draft_tokens
    rows = []
    for bs in batch_sizes:
        need = bs * (requests + 1)
        batches = [[prompts[(i * bs + j) % len(prompts)] for j in range(bs)]
                   for i in range(requests + 1)]
        row = dict(batch=bs, requests=requests, distinct_prompts=min(need, len(prompts)),
                   graphs=engine.graphs, compiled=engine.compiled)
        outs = {}
        for mode, speculative in (("plain", False), ("speculative", True)):
            first = engine.generate(batches[0], new_tokens, speculative=speculative)
            results = [engine.generate(b, new_tokens, speculative=speculative)
                       for b in batches[1:]]
            row[mode] = _mode_stats(first, results, _replay_seconds(engine, replays))
            if profile and bs == 1:
                row[mode]["replay_timeline"] = _replay_profile(engine, 20)
            outs[mode] = [t for r in results for t in r.tokens]
            if speculative:
                st = SpeculativeStats.total([r.stats for r in [first, *results]])
                row["acceptance_by_depth"] = st.acceptance_rate()
                row["tokens_per_round"] = st.mean_tokens_per_forward()
        p, s = row["plain"], row["speculative"]
        row["identical_sequences"] = sum(a == b for a, b in zip(outs["plain"],
                                                                  outs["speculative"]))
        row["sequences"] = len(outs["plain"])
        row["speedup"] = s["tokens_per_s"] / p["tokens_per_s"]
        row["steady_speedup"] = (s["steady_tokens_per_s"] / p["steady_tokens_per_s"]
                                 if s["steady_tokens_per_s"] and p["steady_tokens_per_s"] else None)
        row["round_cost"] = s["step_us"] / p["step_us"]
        tau = STUDY_TOKENS_PER_ROUND.get(depth) if drafts == depth else None
        row["projected_steady_speedup_at_study_acceptance"] = (
            tau / row["round_cost"] if tau else None)
        rows.append(row)
        log(json.dumps(row))
    return rows


ATTENTION_KERNELS = ("auto", "cudnn", "efficient", "flash", "math")
"""--attention choices: torch's own choice, or one scaled-dot-product-attention kernel only."""


@contextlib.contextmanager
def attention_kernels(name: str, fresh: bool):
    """A context in which attention runs the kernel `name` (torch.nn.attention.sdpa_kernel;
    "auto": torch's choice). Compiled regions bake in the kernel chosen when they were traced,
    so `fresh` forgets them first and keeps Inductor's and AOTAutograd's on-disk caches out of
    the context (a cached graph would bring back another variant's kernel)."""
    import torch
    from torch._functorch import config as aot_config
    from torch._inductor import config as inductor_config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        if fresh:
            torch._dynamo.reset()
            stack.enter_context(inductor_config.patch(fx_graph_cache=False))
            stack.enter_context(aot_config.patch(enable_autograd_cache=False))
        if name != "auto":
            stack.enter_context(sdpa_kernel({
                "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[name]))
        yield


def _measure_entry(args, model, source, prompts, batch_sizes, graphs, compile_, depth, log,
                   k, ids, attn, n) -> dict:
    """One model entry of `measure`: its rows on a fresh engine drafting over `ids` (K = `k`;
    None: the whole vocabulary) `n` drafts a round (None: the depth), and with --profile the
    phase profile."""
    t0 = time.perf_counter()
    profile = args.profile and args.tp == 1
    rows = measure_model(model, prompts, batch_sizes, args.requests, args.new_tokens, graphs,
                         compile_, depth, args.replays, log, ids, profile, n)
    entry = dict(source=source, kind=model.config.mtp.kind, depth=depth, draft_vocab=k,
                 draft_tokens=n or depth, attention=attn,
                 dtype=str(model.embedding.output_weight.dtype), rows=rows,
                 seconds=time.perf_counter() - t0)
    if profile:
        entry["profile"] = _phase_profile(model, prompts[:1], args.new_tokens,
                                          bool(rows[0]["compiled"]), ids, n)
        log(json.dumps({"profile": entry["profile"]}))
    return entry


def measure(args: argparse.Namespace) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from data_pipeline import load_manifest
    from model import ParallelContext, accelerator
    from pretrain.export.loading import load_for_inference
    from pretrain.inference import draft_vocab_ids

    ctx, rank = None, 0
    if args.tp > 1:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.tp:
            raise SystemExit(f"bench_generation: --tp {args.tp} needs a world of {args.tp} "
                             f"processes (torchrun --nproc-per-node {args.tp}), not {world}")
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(accelerator.communication_backend())
        ctx, rank = ParallelContext(dist.group.WORLD), dist.get_rank()

    def log(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    graphs = {"auto": None, "on": True, "off": False}[args.graphs]
    compile_ = {"auto": None, "on": True, "off": False}[args.compile]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    prompts = held_out_prompts(args.data, args.prompt_len, max(batch_sizes) * (args.requests + 1))
    if not prompts:
        raise SystemExit(f"bench_generation: no validation window of {args.data} holds "
                         f"--prompt-len {args.prompt_len} tokens")
    draft_sizes = [int(k) for k in args.draft_vocab.split(",") if k]
    counts = [n for n in args.draft_tokens.split(",") if n]
    if args.no_full_vocab and not draft_sizes:
        raise SystemExit("bench_generation: --no-full-vocab leaves nothing to measure without "
                         "--draft-vocab K")
    attention = [a for a in args.attention.split(",") if a]
    unknown = [a for a in attention if a not in ATTENTION_KERNELS]
    if unknown or not attention:
        raise SystemExit(f"bench_generation: --attention {args.attention!r}: choose from "
                         f"{', '.join(ATTENTION_KERNELS)}")
    draft_ids = None  # [K] ids per K in draft_sizes, ranked once with the first model's vocabulary
    result = dict(label=args.label, device=accelerator.device_name(), tp=args.tp,
                  commit=provenance.commit(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  held_out_prompts=len(prompts), models={})
    for depth in [int(x) for x in args.mtp_depths.split(",") if x] or [None]:
        loaded = load_for_inference(args.model, dtype, ctx, mtp_depth=depth)
        model = loaded.model
        depth = model.config.mtp.depth
        log(f"== {loaded.source}: {model.config.mtp.kind} D={model.config.mtp.depth}, "
            f"{sum(p.numel() for p in model.parameters()) * args.tp / 1e6:.0f}M parameters, "
            f"{model.embedding.output_weight.dtype}, TP={args.tp}")
        if draft_sizes and draft_ids is None:
            draft_ids = draft_vocab_ids(load_manifest(args.data), model.config.model.vocab_size,
                                        draft_sizes, "--data")
        vocabularies = ([] if args.no_full_vocab else [(None, None)]) + list(
            zip(draft_sizes, draft_ids or []))
        # "+e": e drafts past the depth; the depth alone by default
        draft_counts = [depth + int(n[1:]) if n.startswith("+") else int(n)
                        for n in counts] or [None]
        for attn in attention:
            # A forced kernel compiles afresh (a cached graph, even another process's, may hold
            # another kernel), once per kernel: the vocabularies then share its compilations.
            with attention_kernels(attn, fresh=attention != ["auto"]):
                for (k, ids), n in itertools.product(vocabularies, draft_counts):
                    entry = _measure_entry(args, model, loaded.source, prompts, batch_sizes,
                                           graphs, compile_, depth, log, k, ids, attn, n)
                    name = (f"D={depth}" + ("" if n in (None, depth) else f" N={n}")
                            + ("" if k is None else f" K={k}")
                            + ("" if attn == "auto" else f" attention={attn}"))
                    result["models"][name] = entry
                    if rank == 0 and args.json:  # after every entry: a run cut short keeps them
                        Path(args.json).write_text(json.dumps(result, indent=1))
        del model, loaded
    if rank == 0:
        print(table([result]), flush=True)
    if args.tp > 1:
        dist.destroy_process_group()
    return result


# ---------------------------------------------------------------------------------- report
def _f(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    """Markdown rows for benchmarks/RESULTS.md from `measure` results."""
    lines = [
        "| model | batch | plain tok/s | speculative tok/s | speed-up (per request) | steady "
        "speed-up | plain / spec steady tok/s | round cost (plain steps) | tokens / round | "
        "projected speed-up at the study's τ | acceptance by depth | per-request ms "
        "(plain / spec) | prefill ms | first request ms (plain / spec) | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, entry in res["models"].items():
            for r in entry["rows"]:
                p, s = r["plain"], r["speculative"]
                lines.append(
                    f"| {res['label']} {name}{' TP=' + str(res['tp']) if res['tp'] > 1 else ''} | "
                    f"{r['batch']} | {p['tokens_per_s']:,.0f} | {s['tokens_per_s']:,.0f} | "
                    f"{r['speedup']:.2f}× | {_f(r['steady_speedup'], '.2f')}× | "
                    f"{_f(p['steady_tokens_per_s'], ',.0f')} / "
                    f"{_f(s['steady_tokens_per_s'], ',.0f')} | {r['round_cost']:.2f} | "
                    f"{r['tokens_per_round']:.2f} | "
                    f"{_f(r['projected_steady_speedup_at_study_acceptance'], '.2f')}× | "
                    f"{' '.join(f'{a:.2f}' for a in r['acceptance_by_depth'])} | "
                    f"{p['request_ms']:.1f} / {s['request_ms']:.1f} | {p['prefill_ms']:.1f} | "
                    f"{p['first_request_ms']:,.0f} / {s['first_request_ms']:,.0f} | "
                    f"{r['identical_sequences']}/{r['sequences']} |")
    profiles = [(res["label"], name, e["profile"]) for res in results
                for name, e in res["models"].items() if "profile" in e]
    if profiles:
        lines += ["", "| model | mode | phase | kernels per call (CPU: operators) | device µs per "
                  "call (CPU: operator µs) |",
                  "|---|---|---|---|---|"]
        for label, name, prof in profiles:
            for mode, pm in prof.items():
                for phase in PHASES:
                    if phase in pm["phases"]:
                        ph = pm["phases"][phase]
                        lines.append(f"| {label} {name} | {mode} | {phase} | "
                                     f"{ph['kernels']:.0f} | {ph['device_us']:.0f} |")
    timelines = [(res["label"], name, mode, r[mode]["replay_timeline"])
                 for res in results for name, e in res["models"].items() for r in e["rows"]
                 for mode in ("plain", "speculative") if r[mode].get("replay_timeline")]
    if timelines:
        lines += ["", "| model | batch 1, replayed | device ops | busy µs | span µs | idle "
                  "| heaviest ops (µs per replay) |", "|---|---|---|---|---|---|---|"]
        for label, name, mode, t in timelines:
            heavy = "; ".join(f"{n[:40]} {us:.0f}" for n, us in t["top"][:3])
            lines.append(f"| {label} {name} | {mode} | {t['ops']:.0f} | {t['busy_us']:.0f} | "
                         f"{t['span_us']:.0f} | {1 - t['busy_us'] / t['span_us']:.0%} | "
                         f"{heavy} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- draft cost
def draft_cost(args: argparse.Namespace) -> str:
    """What a reduced draft vocabulary buys, without a GPU: per shape and K, the share of the
    held-out (validation) tokens among the K most frequent training tokens (the most a draft can
    be right on: a next token outside the K is never drafted), the weights a DeepSeek draft
    reads as a share of a plain step's (one module plus K head rows, against the blocks plus
    the whole head: decoding at batch 1 is bound by reading weights), and the speed-ups that
    share allows with every draft accepted, 2 / (1 + c) at D=1 and 4 / (1 + 3c) at D=3."""
    import torch

    from data_pipeline import load_manifest
    from data_pipeline.token_counts import count_tokens
    from model.generation.draft_vocab import ranking
    from model.transformer import meta_parameters
    from pretrain.config import load_config
    from pretrain.inference import DRAFT_COUNT_TOKENS

    manifest = load_manifest(args.data)
    order = ranking(torch.from_numpy(count_tokens(manifest, DRAFT_COUNT_TOKENS)))
    held_out = torch.from_numpy(count_tokens(manifest, DRAFT_COUNT_TOKENS, split="val"))
    sizes = [int(k) for k in args.draft_vocab.split(",") if k]
    lines = ["| shape | draft vocabulary K | held-out tokens among the K | draft / step "
             "(weights read) | bound D=1 | bound D=3 |", "|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        cfg = load_config(SHAPES[shape]["config"], [
            f"model.vocab_size={manifest.vocab_size}", "mtp.kind=deepseek", "mtp.depth=1",
            *SHAPES[shape].get("overrides", [])])
        params = meta_parameters(cfg.decoder)
        blocks = sum(p.numel() for n, p in params.items() if n.startswith("blocks."))
        module = sum(p.numel() for n, p in params.items() if n.startswith("tail.objective."))
        d, vocab = cfg.model.hidden_size, cfg.model.vocab_size
        for k in [vocab, *sizes]:
            share = (module + k * d) / (blocks + vocab * d)
            covered = float(held_out[order[:k]].sum() / held_out.sum())
            lines.append(f"| {shape} | {k:,}{' (all)' if k == vocab else ''} | "
                         f"{covered:.3f} | {share:.3f} | {2 / (1 + share):.2f}× | "
                         f"{4 / (1 + 3 * share):.2f}× |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- suite
def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run a step of the suite, its output into `log`; stop the suite with the log's end if it
    fails."""
    print(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}", flush=True)
    with open(log, "a") as fh:
        res = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
    if res.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"bench_generation: step failed ({res.returncode}); {log} ends:\n"
                         + "\n".join(tail))


def _export(args: argparse.Namespace, shape: str, depth: int) -> Path:
    """Where the suite keeps the export of `shape` trained with MTP depth `depth`."""
    return args.work / f"export-{shape}-d{depth}"


def _lane(args: argparse.Namespace, shape: str, data: Path, gpu: int | None) -> Path | None:
    """Train, export and measure one shape (on GPU `gpu`): one model per trained depth, each
    measured at its own depth, and as D=1 where no D=1 model is trained. Exports already in
    --work are reused (a second call on the same machine measures without training again).
    Returns the shape's result file (None with --tp2-only: the exports are all the TP = 2 row
    needs)."""
    spec = SHAPES[shape]
    env = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": str(gpu)}
    log = args.out / f"{shape}.log"
    py = [sys.executable]
    steps = args.train_steps
    global_batch = args.global_batch or spec["global_batch"]
    for depth in args.depths:
        run, export = args.work / f"run-{shape}-d{depth}", _export(args, shape, depth)
        if (export / "mtp_config.json").is_file():
            print(f"=== {shape} D={depth}: reusing {export}", flush=True)
            continue
        _run(py + ["-m", "pretrain", "train", "--config", spec["config"], f"data.path={data}",
                   f"run_dir={run}", "mtp.kind=deepseek", f"mtp.depth={depth}",
                   f"train.steps={steps}", f"train.micro_batch_size={spec['micro']}",
                   f"train.global_batch_size={global_batch}", "train.eval_interval=0",
                   f"train.log_interval={max(1, steps // 10)}", "checkpoint.interval=0",
                   f"optim.warmup_steps={max(1, steps // 10)}",
                   # the MTP study's schedule: λ 0.3 for 70 % of the tokens, then 0.1
                   "mtp_weight.values=[0.3,0.1]",
                   f"mtp_weight.boundaries_tokens=[{int(0.7 * steps * global_batch * spec['seq'])}]",
                   *spec.get("overrides", [])],
             log, env)
        _run(py + ["-m", "pretrain", "export", str(run), "--out", str(export), "--with-mtp",
                   "--overwrite"], log, env)
    if args.tp2_only:
        return None
    out = args.out / f"generation-{shape}.json"
    merged = None
    for depth in args.depths:
        prefix = depth > 1 and 1 not in args.depths and not args.own_depth_only
        measured = [depth] + ([1] if prefix else [])
        part = args.work / f"generation-{shape}-d{depth}.json"
        _run(py + [__file__, "measure", str(_export(args, shape, depth)), "--data", str(data),
                   "--mtp-depths", ",".join(map(str, sorted(measured))),
                   "--batch-sizes", args.batch_sizes, "--requests", str(args.requests),
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--compile", args.compile, "--replays", str(args.replays), "--label",
                   shape, "--draft-vocab", args.draft_vocab, "--draft-tokens",
                   args.draft_tokens, "--json", str(part)]
             + (["--no-full-vocab"] if args.no_full_vocab else [])
             + (["--profile"] if args.profile else []), log, env)
        res = json.loads(part.read_text())
        if merged is None:
            merged = res
        else:  # one file per shape; names differ: each depth is measured from one model only
            assert not set(res["models"]) & set(merged["models"]), res["models"].keys()
            merged["models"].update(res["models"])
        out.write_text(json.dumps(merged, indent=1))
    return out


def suite(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    args.work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"bench_generation: unknown shape {unknown}; use {list(SHAPES)}")
    t0 = time.perf_counter()
    data = args.data
    if data is None:
        data = args.work / "data"
        _run([sys.executable, "-m", "pretrain", "prepare", "--source", args.source, "--out",
              str(data), "--vocab-size", "32000", "--seq-len", "1024", "--max-depth", "4",
              "--val-fraction", "0.02", "--tokenizer-sample-mb", "8", "--no-progress"],
             args.out / "prepare.log")
    if args.tp2_only:
        shapes, args.tp2 = shapes[:1], True
    gpus = [None] if args.gpus <= 1 else list(range(args.gpus))
    files: dict[str, Path | None] = {}
    with ThreadPoolExecutor(len(gpus)) as pool:
        lanes = [shapes[i::len(gpus)] for i in range(len(gpus))]

        def lane(i: int) -> None:
            for shape in lanes[i]:
                files[shape] = _lane(args, shape, data, gpus[i])

        for f in [pool.submit(lane, i) for i in range(len(gpus))]:
            f.result()
    results = {s: json.loads(f.read_text()) for s, f in files.items() if f is not None}
    if args.tp2:
        shape = shapes[0]
        out = args.out / f"generation-{shape}-tp2.json"
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", "2", __file__, "measure", str(_export(args, shape, args.depths[0])),
              "--data", str(data), "--tp", "2", "--mtp-depths", "1", "--batch-sizes", "1,8",
              "--requests", str(args.requests), "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.new_tokens), "--replays", str(args.replays),
              "--label", shape, "--draft-vocab", args.draft_vocab, "--json", str(out)],
             args.out / f"{shape}-tp2.log")
        results[f"{shape} TP=2"] = json.loads(out.read_text())
    summary = dict(commit=provenance.commit(), minutes=(time.perf_counter() - t0) / 60,
                   train_steps=args.train_steps, global_batch=args.global_batch,
                   train_depths=args.depths, results=results)
    (args.out / "suite.json").write_text(json.dumps(summary, indent=1))
    first = next(iter(results.values()))
    print(f"\n{first['device']}, commit {first['commit']}, {first['date']}; "
          f"{summary['minutes']:.1f} min in all; prompts: {first['prompt_len']} held-out "
          f"tokens, {first['new_tokens']} new, greedy\n")
    print(table(list(results.values())))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--batch-sizes", default="1,8,32")
        q.add_argument("--requests", type=int, default=16,
                       help="timed requests after the first (which captures graphs)")
        q.add_argument("--prompt-len", type=int, default=128)
        q.add_argument("--new-tokens", type=int, default=256)
        q.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                       help="compile the decoding regions (auto: on GPUs at TP = 1)")
        q.add_argument("--replays", type=int, default=200,
                       help="back-to-back replays of the steady step timed for the round cost")
        q.add_argument("--profile", action="store_true",
                       help="kernels and device time of each decoding phase at batch 1")
        q.add_argument("--draft-vocab", default="", metavar="K,...",
                       help="also measure speculative decoding with drafts over the K most "
                            "frequent tokens of the data's training split, for each K")
        q.add_argument("--draft-tokens", default="", metavar="N,...",
                       help="measure speculative decoding with N drafts a round, for each N "
                            "(+E: E more than the model's depth; default: the depth only; "
                            "N > D chains the last DeepSeek module)")
        q.add_argument("--no-full-vocab", action="store_true",
                       help="measure only the --draft-vocab rows, not drafts over the whole "
                            "vocabulary")

    m = sub.add_parser("measure", help="time one model (an export or a run directory)")
    m.add_argument("model")
    m.add_argument("--data", type=Path, required=True,
                   help="dataset whose validation split gives the prompts")
    m.add_argument("--mtp-depths", default="",
                   help="comma-separated: measure the model with only its first d MTP depths, "
                        "for each d (default: the model's own depth)")
    m.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    m.add_argument("--graphs", choices=["auto", "on", "off"], default="auto")
    m.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size (run under torchrun with as many processes)")
    m.add_argument("--label", default="model", help="the model's name in the table")
    m.add_argument("--attention", default="auto", metavar="KERNEL,...",
                   help="measure each model once per attention kernel: auto (torch's choice), "
                        "cudnn, efficient, flash or math (a kernel that cannot serve a call "
                        "fails it)")
    m.add_argument("--json", help="write the results here")
    common(m)
    s = sub.add_parser("suite", help="prepare data, train, export and measure each shape")
    s.add_argument("--out", type=Path, required=True,
                   help="results: suite.json, one generation-*.json and one log per step")
    s.add_argument("--work", type=Path, default=None,
                   help="data, runs and exports (large; default: OUT/work)")
    s.add_argument("--shapes", default="110m,350m")
    s.add_argument("--data", type=Path, default=None,
                   help="a dataset of seq-1024 windows and vocabulary 32000 (default: stdlib "
                        "shards built into OUT/data)")
    s.add_argument("--source", default="stdlib",
                   help="corpus of the shards built when --data is not given: 'stdlib' or a "
                        "directory of .py files (e.g. the unpacked study pack)")
    s.add_argument("--train-steps", type=int, default=300)
    s.add_argument("--global-batch", type=int, default=None,
                   help="training windows per step (default: the shape's, 32); the MTP "
                        "study's recipe is --train-steps 600 --global-batch 64")
    s.add_argument("--train-depths", default="3", metavar="D,...",
                   help="MTP depths to train, one DeepSeek model each, each measured at its "
                        "own depth (a model deeper than 1 also as D=1 when no D=1 model is "
                        "trained: its first module alone)")
    s.add_argument("--own-depth-only", action="store_true",
                   help="measure each trained model at its own depth only")
    s.add_argument("--gpus", type=int, default=1, help="shapes run side by side, one per GPU")
    s.add_argument("--tp2", action="store_true",
                   help="also measure the first shape at TP = 2 (D=1, batch 1 and 8; 2 GPUs)")
    s.add_argument("--tp2-only", action="store_true",
                   help="train and export the first shape, then measure it at TP = 2 only")
    common(s)
    c = sub.add_parser("draft-cost", help="per draft vocabulary size: held-out coverage, the "
                                          "draft's share of a step, the speed-up bounds (CPU)")
    c.add_argument("--data", type=Path, required=True,
                   help="a prepared dataset: its training split ranks the tokens, its "
                        "validation split is the held-out text")
    c.add_argument("--shapes", default="110m,350m")
    c.add_argument("--draft-vocab", default="1024,2048,4096,8192", metavar="K,...")
    args = p.parse_args(argv)
    if args.cmd == "suite":
        try:
            args.depths = sorted({int(d) for d in args.train_depths.split(",") if d})
        except ValueError:
            args.depths = []
        if not args.depths or min(args.depths) < 1:
            p.error(f"--train-depths {args.train_depths!r}: give MTP depths >= 1, e.g. 1,3")
    if args.cmd == "measure":
        measure(args)
    elif args.cmd == "draft-cost":
        print(draft_cost(args))
    else:
        suite(args)


if __name__ == "__main__":
    main()
