#!/usr/bin/env bash
# The decoding engine's targets on one GPU, with models trained by the MTP study's recipe
# (docs/STUDY.md: 600 steps of 64 windows of 1024 tokens of the pinned Python-code corpus,
# λ 0.3 → 0.1), each part under ten minutes (results recorded in benchmarks/RESULTS.md):
#   PART=1  gpt-110m DeepSeek D=3: train, export, measure (its D=3 rows);
#   PART=2  gpt-110m DeepSeek D=1: train, export, measure (its D=1 rows);
#   PART=3  gpt-350m DeepSeek D=3 trained STEPS_350 steps of 32 windows (default 300),
#           measured as D=3 and as D=1 (its first module alone; SUITE_ARGS=--own-depth-only:
#           as D=3 only).
#   PART=4  the attention-kernel A/B: gpt-110m and gpt-350m DeepSeek D=3 after one training
#           step on stdlib shards (a round's cost does not depend on the weights), each measured
#           once per kernel in ATTENTION (default auto,efficient,math; batch 1 and 8, 4
#           requests after the first): step and round cost and the replayed timeline
#           (AB_SHAPES names other configs, MEASURE_ARGS adds measure options).
# DRAFT_TOKENS=N,... measures each part with N drafts a round for each N (+E: E past the
# depth, where the last module is chained; default: the depth only); DRAFT_VOCAB= (empty) skips
# the K rows, SUITE_ARGS=--no-full-vocab the whole-vocabulary rows; PROFILE=0 skips the profile.
# SIDE_BY_SIDE=1 runs the parts of PART at the same time, one per GPU (logs: $OUT/part-N.log;
# PART_ENV_N="VAR=value ..." sets variables for part N alone).
# Parts 1-3 measure with the whole vocabulary and with drafts over the K most frequent
# tokens for each K in DRAFT_VOCAB (default 2048,4096): batch 1, 8 and 32, 16 requests after
# the first, 128-token held-out prompts, 256 new tokens, greedy, with the phase profile and the
# replayed steps' device timeline (bench_generation.py measure --profile).
# Send the study pack (`python benchmarks/mtp_study.py pack`, into study-pack/) with the tree.
# Shards and exports stay in $WORK (default runs/decoding, inside the tree: a second call on
# the same machine reuses them); results and logs go to $OUT. PART="1 2" runs parts in turn.
set -euo pipefail
PY=${PYTHON:-python}; OUT=${OUT:-decoding-out}; WORK=${WORK:-runs/decoding}
PACK=${PACK:-study-pack}; DRAFT_VOCAB=${DRAFT_VOCAB-2048,4096}; STEPS_350=${STEPS_350:-300}
DRAFT_TOKENS=${DRAFT_TOKENS:-}
BATCHES=${BATCHES:-1,8,32}; SUITE_ARGS=${SUITE_ARGS:-}; MEASURE_ARGS=${MEASURE_ARGS:-}
mkdir -p "$OUT" "$WORK"
stage() { echo "=== $(date -u +%T) $*"; }

code_shards() {  # the pinned-code shards from the study pack, once per $WORK
  [ -f "$WORK/data/manifest.json" ] && return
  stage "shards from $PACK"
  rm -rf "$WORK/corpus" && mkdir -p "$WORK/corpus"
  tar -xJf "$PACK/corpus.tar.xz" -C "$WORK/corpus"
  $PY -m pretrain prepare --source "$WORK/corpus" --out "$WORK/data" --vocab-size 32000 \
    --seq-len 1024 --max-depth 4 --val-fraction 0.02 --no-progress > "$OUT/prepare.log" 2>&1
}

suite() {  # suite SHAPE DEPTHS STEPS GLOBAL_BATCH [SUITE OPTIONS]
  code_shards
  $PY benchmarks/bench_generation.py suite --out "$OUT/$1-d${2//,/}" --work "$WORK" "${@:5}" \
    --data "$WORK/data" --shapes "$1" --train-depths "$2" --train-steps "$3" \
    --global-batch "$4" --batch-sizes "$BATCHES" --requests 16 --draft-vocab "$DRAFT_VOCAB" \
    --draft-tokens "$DRAFT_TOKENS" $([ "${PROFILE:-1}" = 1 ] && echo --profile)
}
attention_ab() {  # untrained models: one step each, then every attention kernel
  local shape data=$WORK/stdlib
  [ -f "$data/manifest.json" ] || $PY -m pretrain prepare --source stdlib --out "$data" \
    --vocab-size 32000 --seq-len 1024 --max-depth 4 --val-fraction 0.02 \
    --tokenizer-sample-mb 8 --no-progress > "$OUT/prepare-stdlib.log" 2>&1
  for shape in ${AB_SHAPES:-gpt-110m gpt-350m}; do
    [ -d "$WORK/init-$shape/checkpoints" ] || $PY -m pretrain train \
      --config "configs/$shape.yaml" data.path="$data" run_dir="$WORK/init-$shape" \
      mtp.kind=deepseek mtp.depth=3 train.steps=1 train.micro_batch_size=4 \
      train.global_batch_size=4 train.eval_interval=0 checkpoint.interval=0 \
      train.compile=false optim.warmup_steps=1 > "$OUT/init-$shape.log" 2>&1
    $PY benchmarks/bench_generation.py measure "$WORK/init-$shape" --data "$data" \
      --mtp-depths 3 --batch-sizes 1,8 --requests 4 --profile --label "$shape-init" $MEASURE_ARGS \
      --attention "${ATTENTION:-auto,efficient,math}" --json "$OUT/attention-$shape.json" \
      > "$OUT/attention-$shape.log" 2>&1
    grep -E "^\| $shape" "$OUT/attention-$shape.log" | grep -v decode || true
  done
}
if [ -n "${SIDE_BY_SIDE:-}" ]; then  # one part per GPU, at the same time (shards made once)
  code_shards
  gpu=0; pids=()
  for part in ${PART:-1}; do
    env_var=PART_ENV_$part  # e.g. PART_ENV_1="DRAFT_TOKENS=+3 PROFILE=1": this part only
    env CUDA_VISIBLE_DEVICES=$gpu PART=$part SIDE_BY_SIDE= ${!env_var:-} bash "$0" \
      > "$OUT/part-$part.log" 2>&1 &
    pids+=($!); gpu=$((gpu + 1))
  done
  rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  tail -n 40 "$OUT"/part-*.log; exit $rc
fi
for part in ${PART:-1}; do
  stage "part $part"
  case $part in
    1) suite 110m 3 600 64 --own-depth-only $SUITE_ARGS ;;
    2) suite 110m 1 600 64 $SUITE_ARGS ;;
    3) suite 350m 3 "$STEPS_350" 32 $SUITE_ARGS ;;
    4) attention_ab ;;
    *) echo "unknown PART $part (1, 2, 3 or 4)"; exit 2 ;;
  esac
done
stage done
