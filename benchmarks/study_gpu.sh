#!/usr/bin/env bash
# One self-contained MTP-study run on an offline GPU machine (the study issue's recipe):
#   send .whl/ (tools/device-wheels.sh) and study-pack/ (mtp_study.py pack) with the tree, then
#   ARMS="none blockwise4-frozen" STEPS=600 OUT=... bash benchmarks/study_gpu.sh
# Builds the shards from the packed pinned-code subset (32k BPE, windows of 1024 + 4 + 1, 2 %
# of files held out), out-of-distribution shards from this machine's Python stdlib with the same
# tokenizer, runs each arm in $ARMS in turn (blockwise4-frozen needs 'none' earlier in the same
# run) and leaves STUDY/<arm>/result.json under $OUT for `mtp_study.py report`. Arguments after
# the script name go to every `mtp_study.py run` (e.g. --config, overrides); VOCAB and SEQ_LEN
# size the shards (defaults: 32000, 1024, the ~110M config's).
set -euo pipefail
OUT=${OUT:-study-out}; STEPS=${STEPS:-600}; ARMS=${ARMS:-none}; PY=${PYTHON:-python}
PACK=${PACK:-study-pack}; WORK=${WORK:-/tmp/mtp-study}; VOCAB=${VOCAB:-32000}; SEQ_LEN=${SEQ_LEN:-1024}
mkdir -p "$OUT" "$WORK/corpus"
stage() { echo "=== $(date -u +%T) $*"; }
stage unpack; tar -xJf "$PACK/corpus.tar.xz" -C "$WORK/corpus"
stage "shards (code)"
$PY -m pretrain prepare --source "$WORK/corpus" --out "$WORK/data" --vocab-size "$VOCAB" \
  --seq-len "$SEQ_LEN" --max-depth 4 --val-fraction 0.02 --no-progress
stage "shards (out of distribution: this Python's stdlib, same tokenizer)"
$PY -m pretrain prepare --source stdlib --tokenizer "$WORK/data/tokenizer.model" \
  --vocab-size "$VOCAB" --seq-len "$SEQ_LEN" --max-depth 4 --val-fraction 0.5 --out "$WORK/ood" \
  --no-progress
for arm in $ARMS; do
  stage "arm $arm"
  $PY benchmarks/mtp_study.py run "$arm" --data "$WORK/data" --ood-data "$WORK/ood" \
    --out "$WORK/study" --steps "$STEPS" "$@"
  mkdir -p "$OUT/study/$arm"; cp "$WORK/study/$arm/result.json" "$OUT/study/$arm/"
done
stage done
