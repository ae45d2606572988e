#!/usr/bin/env bash
# The GPU benchmark session on one 2-GPU machine, as recorded in benchmarks/RESULTS.md:
#   1. shards from the Python stdlib (seq 1024 and 2048, one tokenizer);
#   2. GPU 0: training throughput, ours vs plain compiled PyTorch vs megatron-core GPTModel
#      (bench_training.py; rows in $TRAIN_ROWS_110M / $TRAIN_ROWS_350M);
#      GPU 1 meanwhile: gpt-110m with DeepSeek MTP D=1 trained $STEPS steps, exported, then
#      plain vs self-speculative decoding through the decoding engine (bench_generation.py
#      measure);
#   3. both GPUs: data-parallel rows (ZeRO-1 and ZeRO-2).
# Results land in $OUT (default bench-out). From the repository root, project importable.
set -uo pipefail
OUT=${OUT:-bench-out}; STEPS=${STEPS:-150}; PY=${PYTHON:-python}; DATA=${DATA:-$OUT/bench-data}
TRAIN_ROWS_110M=${TRAIN_ROWS_110M:-ours-none,plain,megatron-mtp0}
TRAIN_ROWS_350M=${TRAIN_ROWS_350M:-ours-none,plain}
MULTI_ROWS=${MULTI_ROWS:-ours-none-dp2-zero1,ours-none-dp2-zero2}
mkdir -p "$OUT"
stage() { echo "=== $(date -u +%T) $*"; }
B=("$PY" benchmarks/bench_training.py --data "$DATA" --steps 10 --warmup 4 --logs "$OUT/logs")

stage prepare
$PY - "$DATA" <<'PYEOF' || exit 1
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
import bench_training as b
for name in ("110m", "350m"):
    b._prepare(Path(sys.argv[1]), b.SHAPES[name])
PYEOF

stage "single-GPU training rows (GPU 0) and the generation pipeline (GPU 1)"
(
  export CUDA_VISIBLE_DEVICES=0
  "${B[@]}" --shapes 110m --rows "$TRAIN_ROWS_110M" --json "$OUT/train-110m.json" \
    --profile "110m:ours-none=$OUT/profile-110m-ours-none.txt"
  "${B[@]}" --shapes 350m --rows "$TRAIN_ROWS_350M" --json "$OUT/train-350m.json"
) > "$OUT/train-single.log" 2>&1 &
single=$!
(
  export CUDA_VISIBLE_DEVICES=1
  run="$OUT/run-deepseek1"
  $PY -m pretrain train --config configs/gpt-110m.yaml run_dir="$run" \
    data.path="$DATA/stdlib-seq1024" train.steps="$STEPS" train.log_interval=25 \
    train.eval_interval=0 checkpoint.interval=0 optim.warmup_steps=30 &&
  $PY -m pretrain export "$run" --out "$OUT/export-deepseek1" --with-mtp --overwrite &&
  $PY benchmarks/bench_generation.py measure "$OUT/export-deepseek1" \
    --data "$DATA/stdlib-seq1024" --batch-sizes 1,8 --json "$OUT/generation-deepseek1.json"
) > "$OUT/generation.log" 2>&1 &
gen=$!
wait $single; wait $gen
grep -v "^\[20\|warn" "$OUT/train-single.log" | tail -12
grep "^{\|^|" "$OUT/generation.log"

stage "data-parallel rows (both GPUs)"
"${B[@]}" --shapes 110m --gpus 2 --rows "$MULTI_ROWS" --json "$OUT/train-multi.json" 2>&1 | \
  grep -v "^\[20\|warn" | tail -6
stage done
