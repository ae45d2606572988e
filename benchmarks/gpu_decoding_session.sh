#!/usr/bin/env bash
# The decoding engine's targets on one GPU, with models trained by the MTP study's recipe
# (docs/STUDY.md: 600 steps of 64 windows of 1024 tokens of the pinned Python-code corpus,
# λ 0.3 → 0.1), each part under ten minutes (results recorded in benchmarks/RESULTS.md):
#   PART=1  gpt-110m DeepSeek D=3: train, export, measure (its D=3 rows);
#   PART=2  gpt-110m DeepSeek D=1: train, export, measure (its D=1 rows);
#   PART=3  gpt-350m DeepSeek D=3 trained STEPS_350 steps of 32 windows (default 300),
#           measured as D=3 and as D=1 (its first module alone; SUITE_ARGS=--own-depth-only:
#           as D=3 only).
# Every part measures with the whole vocabulary and with drafts over the K most frequent
# tokens for each K in DRAFT_VOCAB (default 2048,4096): batch 1, 8 and 32, 16 requests after
# the first, 128-token held-out prompts, 256 new tokens, greedy, with the phase profile and the
# replayed steps' device timeline (bench_generation.py measure --profile).
# Send the study pack (`python benchmarks/mtp_study.py pack`, into study-pack/) with the tree.
# Shards and exports stay in $WORK (default runs/decoding, inside the tree: a second call on
# the same machine reuses them); results and logs go to $OUT. PART="1 2" runs parts in turn.
set -euo pipefail
PY=${PYTHON:-python}; OUT=${OUT:-decoding-out}; WORK=${WORK:-runs/decoding}
PACK=${PACK:-study-pack}; DRAFT_VOCAB=${DRAFT_VOCAB:-2048,4096}; STEPS_350=${STEPS_350:-300}
BATCHES=${BATCHES:-1,8,32}; SUITE_ARGS=${SUITE_ARGS:-}
mkdir -p "$OUT" "$WORK"
stage() { echo "=== $(date -u +%T) $*"; }

if [ ! -f "$WORK/data/manifest.json" ]; then
  stage "shards from $PACK"
  rm -rf "$WORK/corpus" && mkdir -p "$WORK/corpus"
  tar -xJf "$PACK/corpus.tar.xz" -C "$WORK/corpus"
  $PY -m pretrain prepare --source "$WORK/corpus" --out "$WORK/data" --vocab-size 32000 \
    --seq-len 1024 --max-depth 4 --val-fraction 0.02 --no-progress > "$OUT/prepare.log" 2>&1
fi

suite() {  # suite SHAPE DEPTHS STEPS GLOBAL_BATCH [SUITE OPTIONS]
  $PY benchmarks/bench_generation.py suite --out "$OUT/$1-d${2//,/}" --work "$WORK" "${@:5}" \
    --data "$WORK/data" --shapes "$1" --train-depths "$2" --train-steps "$3" \
    --global-batch "$4" --batch-sizes "$BATCHES" --requests 16 --draft-vocab "$DRAFT_VOCAB" \
    --profile
}
for part in ${PART:-1}; do
  stage "part $part"
  case $part in
    1) suite 110m 3 600 64 --own-depth-only ;;
    2) suite 110m 1 600 64 ;;
    3) suite 350m 3 "$STEPS_350" 32 $SUITE_ARGS ;;
    *) echo "unknown PART $part (1, 2 or 3)"; exit 2 ;;
  esac
done
stage done
