#!/usr/bin/env bash
# One self-contained MTP-study run on an offline GPU machine (the study issue's recipe):
#   send .whl/ (tools/device-wheels.sh) and study-pack/ (mtp_study.py pack) with the tree, then
#   LANES="none,blockwise4-frozen deepseek1 deepseek3 parallel4" STEPS=360 OUT=... \
#     bash benchmarks/study_gpu.sh
# Builds the shards from the packed pinned-code subset (32k BPE, windows of 1024 + 4 + 1, 2 %
# of files held out) and out-of-distribution shards from this machine's Python stdlib with the
# same tokenizer, then runs the arms. LANES is a space-separated list of lanes; lane i runs on
# GPU i, its comma-separated arms one after another (blockwise4-frozen needs 'none' earlier in
# its lane); lanes run at the same time. ARMS="a b" (one lane, in turn) is the one-GPU form.
# Every finished arm leaves STUDY/<arm>/result.json under $OUT for `mtp_study.py report`, and each
# lane its log, so a run cut short still returns what it finished. Arguments after the script
# name go to every `mtp_study.py run` (e.g. --config, overrides); VOCAB and SEQ_LEN size the
# shards (defaults: 32000, 1024, the ~110M config's); OOD_SOURCE is the out-of-distribution
# corpus (default: stdlib; the CPU test gives one stdlib package, as its arms read 2 batches).
set -euo pipefail
OUT=${OUT:-study-out}; STEPS=${STEPS:-600}; PY=${PYTHON:-python}
ARMS=${ARMS:-none}; LANES=${LANES:-$(echo $ARMS | tr ' ' ',')}
PACK=${PACK:-study-pack}; WORK=${WORK:-/tmp/mtp-study}; VOCAB=${VOCAB:-32000}; SEQ_LEN=${SEQ_LEN:-1024}
OOD_SOURCE=${OOD_SOURCE:-stdlib}
mkdir -p "$OUT/study" "$WORK/corpus"
stage() { echo "=== $(date -u +%T) $*"; }
stage unpack; tar -xJf "$PACK/corpus.tar.xz" -C "$WORK/corpus"
stage "shards (code)"
$PY -m pretrain prepare --source "$WORK/corpus" --out "$WORK/data" --vocab-size "$VOCAB" \
  --seq-len "$SEQ_LEN" --max-depth 4 --val-fraction 0.02 --no-progress
stage "shards (out of distribution: $OOD_SOURCE, same tokenizer)"
$PY -m pretrain prepare --source "$OOD_SOURCE" --tokenizer "$WORK/data/tokenizer.model" \
  --vocab-size "$VOCAB" --seq-len "$SEQ_LEN" --max-depth 4 --val-fraction 0.5 --out "$WORK/ood" \
  --no-progress

run_lane() {  # run_lane GPU ARM[,ARM...]: the lane's arms in order; stops at the first failure
  local gpu=$1 arm
  for arm in ${2//,/ }; do
    echo "=== $(date -u +%T) arm $arm (GPU $gpu)"
    CUDA_VISIBLE_DEVICES=$gpu $PY benchmarks/mtp_study.py run "$arm" --data "$WORK/data" \
      --ood-data "$WORK/ood" --out "$WORK/study" --steps "$STEPS" "${@:3}" || return 1
    mkdir -p "$OUT/study/$arm"; cp "$WORK/study/$arm/result.json" "$OUT/study/$arm/"
  done
}
# Inductor compiles with a worker per core by default; share the cores between the lanes.
lanes=$(echo $LANES | wc -w)
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / lanes > 0 ? $(nproc) / lanes : 1 ))}
pids=(); gpu=0
for lane in $LANES; do
  stage "lane $gpu: $lane"
  run_lane "$gpu" "$lane" "$@" > "$OUT/lane-$gpu.log" 2>&1 &
  pids+=($!); gpu=$((gpu + 1))
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=1; echo "lane $i failed; its log ends:"; tail -n 25 "$OUT/lane-$i.log"
  fi
done
grep -h "mtp_study: arm" "$OUT"/lane-*.log || true
stage done
exit $failed
