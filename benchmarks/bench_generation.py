"""Plain greedy vs self-speculative greedy decoding: tokens/s at batch 1 and 8 on held-out
prompts, with acceptance statistics and a check that both produce the same tokens.

    python benchmarks/bench_generation.py EXPORT_OR_RUN --data DATA [--json out.json]

Each batch size is measured eagerly (one kernel launch per op, host-side bookkeeping) and with
device graphs (each greedy decoding step / speculative round replayed as one captured graph;
GPUs only). Warm-up runs are excluded; every timed run ends with the tokens on the host.

Each request's time includes its own prefill, first (eager) round and, with graphs, its own graph
capture. Timing the same prompts also at --short-tokens splits it as time = per-request cost +
tokens × steady-state cost per token; "steady speedup" is the ratio of the steady-state rates,
what long generations approach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import provenance  # noqa: E402  (benchmarks/, the script's own folder)


def split_request_time(long_seconds: float, long_tokens: int, short_seconds: float,
                       short_tokens: int, requests: int) -> tuple[float | None, float | None]:
    """Fit time = requests × per-request cost + tokens × steady cost per token through a long and
    a short run of the same requests: (per-request ms, steady-state tokens/s), or (None, None)
    when the two runs cannot separate them (EOS cut the long run to the short one's length).

    The fit assumes one cost per token in both runs. With device graphs every step attends over
    the whole cache, which is shorter in the short run, so the fitted per-token cost comes out a
    little high (the steady rate a little low) and the per-request cost a little low, for plain
    and speculative decoding alike."""
    if long_tokens <= short_tokens or long_seconds <= short_seconds:
        return None, None
    per_token = (long_seconds - short_seconds) / (long_tokens - short_tokens)
    return 1e3 * (long_seconds - per_token * long_tokens) / requests, 1.0 / per_token


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export directory (with the MTP tail) or run/checkpoint directory")
    p.add_argument("--data", required=True, help="dataset directory: prompts come from its val split")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--short-tokens", type=int, default=None,
                   help="also time requests of this many new tokens (default: a quarter of "
                        "--new-tokens; 0: off) and split the time into a per-request cost "
                        "(prefill, first round, graph capture) and a steady-state cost per token")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights and compute dtype (auto: bf16 on GPUs)")
    p.add_argument("--modes", default="eager,graphs",
                   help="comma-separated: eager, graphs (device graphs; skipped on CPU)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from data_pipeline import ShardLoader
    from model import accelerator
    from model.generation import generate, generate_speculative
    from pretrain.export.loading import load_for_inference

    loaded = load_for_inference(args.model, {"auto": None, "fp32": torch.float32,
                                             "bf16": torch.bfloat16}[args.dtype])
    model = loaded.model
    loader = ShardLoader(args.data, "val", dp_rank=0, dp_size=1, num_workers=0, batch_size=8,
                         seed=0, depth=0, mask_cross_document=False, infinite=False, shuffle=False)
    prompts: list[list[int]] = []
    for batch in loader:
        prompts += [row[: args.prompt_len].tolist() for row in batch["input_ids"]]
        if len(prompts) >= args.prompts:
            break
    prompts = prompts[: args.prompts]

    def timed(fn, batch_size, graphs, new_tokens=args.new_tokens):
        """(outputs, stats, tokens/s, seconds, tokens) over all prompts, request by request."""
        outs, stats, seconds = [], [], 0.0
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            accelerator.synchronize()
            t0 = time.perf_counter()
            r = fn(model, chunk, new_tokens, graphs=graphs)
            seconds += time.perf_counter() - t0
            outs += r.tokens
            if r.stats is not None:
                stats.append(r.stats)
        tokens = sum(len(t) for t in outs)
        return outs, stats, tokens / seconds, seconds, tokens

    short = args.new_tokens // 4 if args.short_tokens is None else args.short_tokens
    if short and not 0 < short < args.new_tokens:
        p.error(f"--short-tokens {short} must lie between 0 and --new-tokens {args.new_tokens}")

    def split(fn, batch_size, graphs, long_seconds, long_tokens):
        _, _, _, s_seconds, s_tokens = timed(fn, batch_size, graphs, short)
        return split_request_time(long_seconds, long_tokens, s_seconds, s_tokens,
                                  requests=-(-len(prompts) // batch_size))

    modes = [m for m in args.modes.split(",") if m != "graphs" or accelerator.graphs_supported()]
    rows = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        for mode in modes:
            graphs = mode == "graphs"
            generate(model, prompts[:bs], 8, graphs=graphs)  # warm-up (allocator, kernels)
            generate_speculative(model, prompts[:bs], 8, graphs=graphs)
            plain_out, _, plain_tps, plain_s, plain_n = timed(generate, bs, graphs)
            spec_out, stats, spec_tps, spec_s, spec_n = timed(generate_speculative, bs, graphs)
            steady = {}
            if short:
                plain_req, plain_steady = split(generate, bs, graphs, plain_s, plain_n)
                spec_req, spec_steady = split(generate_speculative, bs, graphs, spec_s, spec_n)
                steady = dict(short_tokens=short, plain_request_ms=plain_req,
                              speculative_request_ms=spec_req,
                              plain_steady_tokens_per_s=plain_steady,
                              speculative_steady_tokens_per_s=spec_steady,
                              steady_speedup=(spec_steady / plain_steady
                                              if plain_steady and spec_steady else None))
            depth = model.config.mtp.depth
            proposed = [sum(s.proposed[j] for s in stats) for j in range(depth)]
            accepted = [sum(s.accepted[j] for s in stats) for j in range(depth)]
            forwards = sum(s.main_forwards for s in stats)
            produced = sum(s.tokens for s in stats)
            same = sum(a == b for a, b in zip(plain_out, spec_out))
            rows.append(dict(batch=bs, mode=mode, plain_tokens_per_s=plain_tps,
                             speculative_tokens_per_s=spec_tps, speedup=spec_tps / plain_tps,
                             acceptance_by_depth=[a / p for a, p in zip(accepted, proposed)],
                             mean_tokens_per_forward=produced / forwards,
                             identical_sequences=f"{same}/{len(prompts)}", **steady))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(device=accelerator.device_name(), dtype=str(model.embedding.output_weight.dtype),
                  model=loaded.source, mtp=dict(kind=model.config.mtp.kind, depth=model.config.mtp.depth),
                  prompts=len(prompts), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=provenance.commit(),
                  rows=rows)
    print("| batch | mode | plain tok/s | speculative tok/s | speedup | acceptance by depth | "
          "tokens/forward | identical | per-request ms (plain / spec) | steady speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def f(x, spec):
        return "—" if x is None else format(x, spec)

    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['plain_tokens_per_s']:.0f} | {r['speculative_tokens_per_s']:.0f} | "
              f"{r['speedup']:.2f}× | {' '.join(f'{a:.2f}' for a in r['acceptance_by_depth'])} | "
              f"{r['mean_tokens_per_forward']:.2f} | {r['identical_sequences']} | "
              f"{f(r.get('plain_request_ms'), '.1f')} / {f(r.get('speculative_request_ms'), '.1f')} | "
              f"{f(r.get('steady_speedup'), '.2f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
