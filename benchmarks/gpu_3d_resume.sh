#!/usr/bin/env bash
# The multi-GPU end-to-end run on one host (the 3-D parallel issue's recipe): the ~350M config
# with DeepSeek MTP D=1 over all of the host's GPUs as TP × PP × DP, on the real code corpus.
#   1. shards from the packed pinned-code subset (PACK, see `mtp_study.py pack`; seq 2048);
#   2. run A: STEPS steps, a checkpoint at STEPS/2 and at the end;
#   3. run B: a fresh job resumed from run A's mid-way checkpoint, trained to STEPS;
#   4. run B's per-step losses compared with run A's: the first step after the resume depends
#      only on the restored weights and data position, so its loss must match bit for bit;
#      later steps may differ by the GPU's non-deterministic backward kernels (reported);
#   5. run A exported (main model alone) and scored on held-out windows by transformers'
#      LlamaForCausalLM.
#     PACK=study-pack TP=2 PP=2 STEPS=200 OUT=... bash benchmarks/gpu_3d_resume.sh
# The world is every visible GPU (NGPU to override); DP = world / (TP × PP). Extra arguments go
# to both training runs as config overrides. Results: $OUT/summary.json and the runs' logs.
# CONFIG and DATA (an existing dataset: no corpus pack needed) allow a small CPU rehearsal:
#   NGPU=2 TP=1 PP=2 STEPS=6 GLOBAL=8 MICRO=2 CONFIG=configs/tiny-cpu.yaml DATA=... bash ...
set -euo pipefail
OUT=${OUT:-3d-out}; STEPS=${STEPS:-200}; TP=${TP:-2}; PP=${PP:-2}; PY=${PYTHON:-python}
PACK=${PACK:-study-pack}; WORK=${WORK:-/tmp/mtp-3d}; GLOBAL=${GLOBAL:-64}; MICRO=${MICRO:-8}
CONFIG=${CONFIG:-configs/gpt-350m.yaml}; DATA=${DATA:-$WORK/data}
NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())")}
HALF=$((STEPS / 2))
mkdir -p "$OUT" "$WORK/corpus"
stage() { echo "=== $(date -u +%T) $*"; }

if [ ! -f "$DATA/manifest.json" ]; then
  stage unpack; tar -xJf "$PACK/corpus.tar.xz" -C "$WORK/corpus"
  stage "shards (code, seq 2048)"
  $PY -m pretrain prepare --source "$WORK/corpus" --out "$DATA" --vocab-size 32000 \
    --seq-len 2048 --max-depth 4 --val-fraction 0.02 --no-progress
fi

train() {  # train RUN_DIR [--resume PATH]: one torchrun job on every GPU
  local run=$1; shift
  $PY -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m pretrain train \
    --config "$CONFIG" run_dir="$run" data.path="$DATA" \
    parallel.tp="$TP" parallel.pp="$PP" train.steps="$STEPS" train.global_batch_size="$GLOBAL" \
    train.micro_batch_size="$MICRO" train.log_interval=1 train.eval_interval=0 \
    optim.warmup_steps=20 checkpoint.interval="$HALF" "$@" "${OVERRIDES[@]}"
}
OVERRIDES=("$@")
run_logged() {  # run_logged NAME ARGS...: train into $OUT/NAME, log to $OUT/NAME.log
  local name=$1; shift
  if ! train "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
    tail -40 "$OUT/$name.log"; echo "$name failed"; exit 1
  fi
  grep -E "^step [0-9]*0/|resumed|checkpoint" "$OUT/$name.log" || true
}
stage "run A: $STEPS steps on $NGPU GPUs (TP $TP × PP $PP), checkpoints at $HALF and $STEPS"
run_logged run-a
stage "run B: resumed from run A's step-$HALF checkpoint"
run_logged run-b --resume "$OUT/run-a/checkpoints/$(printf 'step_%08d' "$HALF")"
stage "export run A"
$PY -m pretrain export "$OUT/run-a" --out "$OUT/export" --overwrite
stage "compare and score"
$PY - "$OUT" "$DATA" "$HALF" "$STEPS" "$NGPU" "$TP" "$PP" <<'PYEOF'
import json, re, sys
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaForCausalLM

out, data, half, steps, ngpu, tp, pp = (Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:]))


def scalars(run):
    vals = {}
    for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                vals.setdefault(tag, {})[ev.step] = ev.value
    return vals


a, b = scalars(out / "run-a"), scalars(out / "run-b")
compared = [s for s in range(half + 1, steps + 1) if s in b["loss/main"]]
assert compared and compared[0] == half + 1, f"run B logged no step after {half}"
tags = [t for t in a if t.startswith(("loss/", "optim/grad_norm")) and t in b]
first_diff = {t: abs(a[t][half + 1] - b[t][half + 1]) for t in tags}
max_diff = {t: max(abs(a[t][s] - b[t][s]) for s in compared) for t in tags}
timed = [s for s in a["perf/tokens_per_s"] if s > 10 and s != half + 1]  # past compilation,
tps = float(np.median([a["perf/tokens_per_s"][s] for s in timed])) if timed else None  # not saving
mfu = float(np.median([a["perf/mfu"][s] for s in timed])) if timed and "perf/mfu" in a else None

# The export in transformers: mean next-token loss over held-out windows.
from data_pipeline import ShardLoader
loader = ShardLoader(str(data), "val", dp_rank=0, dp_size=1, num_workers=0, batch_size=4,
                     seed=0, depth=0, infinite=False)
gpu = torch.cuda.is_available()
dev = "cuda" if gpu else "cpu"
model = LlamaForCausalLM.from_pretrained(
    out / "export", torch_dtype=torch.bfloat16 if gpu else torch.float32).to(dev).eval()
losses = []
with torch.no_grad():
    for i, batch in enumerate(loader):
        if i == 4:
            break
        ids = batch["input_ids"].to(dev)
        losses.append(model(input_ids=ids, labels=ids).loss.float().item())
summary = {
    "gpus": ngpu, "tp": tp, "pp": pp, "dp": ngpu // (tp * pp), "steps": steps,
    "resumed_from": half, "compared_steps": len(compared),
    "abs_diff_first_step_after_resume": first_diff, "max_abs_diff_after_resume": max_diff,
    "run_a_last": {t: a[t][steps] for t in ("loss/main", "loss/depth_1") if t in a},
    "tokens_per_s_median": tps, "mfu_median": mfu,
    "peak_gib": max(a["memory/peak_gib"].values()) if "memory/peak_gib" in a else None,
    "export_hf_val_loss": float(np.mean(losses)), "device": torch.cuda.get_device_name() if gpu else "cpu",
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF
stage done
