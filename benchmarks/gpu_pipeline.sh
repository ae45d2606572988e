#!/usr/bin/env bash
# One-GPU end-to-end run and benchmark: dataset from the Python stdlib (32k BPE, windows of
# 1024 + 4 + 1), the ~110M config with DeepSeek MTP (D = $DEPTH) trained for $STEPS steps,
# export, `mtp eval` (loss per depth, real acceptance), plain vs self-speculative decoding at
# batch 1 and 8, and the MTP memory benchmark. Results land in $OUT (default bench-out).
#   bash benchmarks/gpu_pipeline.sh            # from the repository root, project installed
set -uo pipefail
OUT=${OUT:-bench-out}; STEPS=${STEPS:-300}; DEPTH=${DEPTH:-1}; KIND=${KIND:-deepseek}
PY=${PYTHON:-python}
mkdir -p "$OUT"
stage() { echo "=== $(date -u +%T) $*"; }
stage prepare
[ -f "$OUT/data/manifest.json" ] || $PY -m pretrain prepare --source stdlib --out "$OUT/data" \
  --vocab-size 32000 --seq-len 1024 --max-depth 4 --no-progress || exit 1
stage "train ${KIND} D=${DEPTH}, ${STEPS} steps"
$PY -m pretrain train --config configs/gpt-110m.yaml run_dir="$OUT/run-$KIND$DEPTH" \
  data.path="$OUT/data" mtp.kind="$KIND" mtp.depth="$DEPTH" train.steps="$STEPS" \
  train.log_interval=25 train.eval_interval="$STEPS" train.eval_batches=8 checkpoint.interval=0 \
  optim.warmup_steps=50 "$@" 2>&1 | tee "$OUT/train-$KIND$DEPTH.log" | grep -v "^\[20" || exit 1
stage export
$PY -m pretrain export "$OUT/run-$KIND$DEPTH" --out "$OUT/export-$KIND$DEPTH" --with-mtp --overwrite || exit 1
stage eval
$PY -m pretrain eval "$OUT/run-$KIND$DEPTH" --data "$OUT/data" --prompts 32 --new-tokens 64 \
  --json "$OUT/eval-$KIND$DEPTH.json"
stage generation benchmark
$PY benchmarks/bench_generation.py measure "$OUT/export-$KIND$DEPTH" --data "$OUT/data" \
  --json "$OUT/generation-$KIND$DEPTH.json"
stage done
