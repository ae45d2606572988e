#!/usr/bin/env bash
# The GPU measurements of the scale work, on one 2-GPU machine, in two parts of under ten
# minutes each (results recorded in benchmarks/RESULTS.md):
#   PART=1  stdlib shards (seq 1024 and 4096, one 32k tokenizer);
#           GPU 0: gpt-110m throughput at this commit (ours-none, ours-deepseek1) and with
#                  document-masked attention (ours-deepseek1 + data.mask_cross_document);
#           GPU 1: the same two rows on the tree in $OLD (the commit before the architecture
#                  work), with its own shards — the before/after A/B;
#           both:  llama3-8b TP 2 with sequence parallelism, selective recomputation at
#                  micro-batch 1 and full recomputation at micro-batch 2 (peak memory, tokens/s,
#                  MFU; the plan's figure is `mtp plan` for the same config).
#   PART=2  GPU 1: the decoding engine (bench_generation.py suite, gpt-110m);
#           GPU 0: the A/B's rows on $OLD (AB=0 skips them), then gpt-1b checkpoints: one written in the background, the final one in the
#                  foreground (the pause each costs the training loop);
#           both:  gpt-350m at TP 2 checkpointing at step 6, resumed at DP 2 ZeRO-1 (the
#                  reshard on load), and `mtp checkpoint convert` of it to TP 1.
#   PART=3  GPU 0: gpt-1b checkpoints again (two in the background, reusing their host
#                  buffers, then the final one), then the A/B's rows at this commit;
#           GPU 1: the A/B's rows on $OLD (the same machine as the rows above);
#           both:  llama3-8b as in part 1 (selective, micro-batch 1) with compile off, stopped
#                  after its sixth step (no final checkpoint): where the plan's gap comes from.
#   PART=4  both:  llama3-8b TP 2, compile off, three steps each with the allocator's history
#                  (train.memory_snapshot_steps=2): SP + selective at micro-batch 1, no SP and
#                  no recomputation at micro-batch 1, SP + full at micro-batch 2; what is live
#                  at each peak (benchmarks/memory_peak.py) beside `mtp plan` for the same run.
#                  SPECS="recompute micro sp;..." picks the layouts, COMPILE=true compiles them
#                  (what a compiled checkpoint keeps: `COMPILE=true SPECS="full 2 true" PART=4`).
#   PART=5  both:  llama3-8b TP 2 (the shipped layout at 4 micro-batches of 2 a step), compile
#                  off, a background checkpoint at step 10 (host buffers reserved from start-up):
#                  the pause, the reservation's time and its effect on the steps, the write time,
#                  the size on disk;
#           then, in the time left: GPU 0: gpt-350m D=1 causal vs document-masked attention;
#                  GPU 1: gpt-110m before/after A/B, one tree after the other on the same card
#                  (AB=0 skips the A/B, NO350=1 both).
#   PART=6  both:  the rest of the llama3-8b table, compiled, 7 steps each (steady steps 4-7):
#                  SPECS="recompute micro sp tp zero;..." (default: SP + none at micro 1, SP +
#                  selective at micro 2, SP + full at micro 1, and ZeRO-3 DP 2 with selective at
#                  micro 1), each beside `mtp plan`; fields after the fifth are further overrides
#                  (e.g. "selective 1 true 2 1 model.loss_chunk_tokens=1024"; the global batch
#                  is 4 micro-batches unless one sets train.global_batch_size); COMPILE=true
#                  compiles sequence-parallel rows, which auto runs eager on GPUs. About two minutes
#                  a row: split SPECS over two calls to stay under ten minutes.
#   PART=7  GPU 0: gpt-1b on one GPU, MTP off and D=1 (micro 8, global GLOBAL_1B=16; ONE_GPU=
#                  "off d1" picks the rows, ONE_GPU="" none, leaving GPU 0 free for other work);
#           GPU 1: the gradient-accumulation A/B: gpt-110m, 200 steps, bf16 vs fp32
#                  accumulation (train.grad_accum_dtype), same data and seed, loss every 10 steps
#                  (ACCUM_AB=0 skips it);
#           both:  gpt-1b DP 2 with ZeRO-1 and with ZeRO-2 at the same global batch (scaling
#                  against the one-GPU D=1 row).
#   PART=8  both:  llama3-70b truncated to 2 and to 4 layers (TP 2, SP, selective, micro 1,
#                  compile off, 3 steps): the measured peak per layer against `mtp plan`'s
#                  (LAYERS="2 4" picks the depths).
#   PART=9  both:  the decoding engine at TP 2 (bench_generation.py suite --tp2-only, gpt-110m
#                  trained 200 steps, 16 requests after the first, batch 1 and 8).
#   PART=10 both:  gradient parity: gpt-110m's first three steps (loss, gradient norm) on the same
#                  batches at TP 2 with and without sequence parallelism, compiled and eager, and
#                  at DP 2 with bf16 and fp32 gradient accumulation (SPECS="tp sp compile
#                  [overrides];..."). Written after the session that found them disagreeing.
# Parts 6-9 were written after the session that measured parts 1-5, part 10 after the session
# whose compiled sequence-parallel rows disagreed with eager ones on the gradient (the cause, traced
# collectives, was found with benchmarks/check_tp_grads.py; model/tp_regions.py).
# From the repository root, project importable; results in $OUT. PART="6 8" runs parts in turn.
set -uo pipefail
OUT=${OUT:-bench-out}; PY=${PYTHON:-python}; WORK=${WORK:-/tmp/scale}; OLD=${OLD:-.old}
PART=${PART:-1}
part() { [[ " $PART " == *" $1 "* ]]; }  # PART="6 8" runs both, in order
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
stage() { echo "=== $(date -u +%T) $*"; }
keep() { grep -E "step [0-9]+/|checkpoint|reshard|resumed|error|Error|plan|converted|peak" "$@" \
         | grep -v "^\[20" | cut -c1-400; }
train() { $PY -m pretrain train "$@" train.eval_interval=0 train.log_interval=1; }
DATA=$WORK/data
prep() {  # seq length, then the tokenizer to reuse (if any)
  local out=$DATA/stdlib-seq$1
  [ -f "$out/manifest.json" ] && return 0
  $PY -m pretrain prepare --source stdlib --out "$out" --vocab-size 32000 --seq-len "$1" \
    --max-depth 4 --tokenizer-sample-mb 8 --no-progress ${2:+--tokenizer "$2"}
}
prepare() {  # the seq-1024 shards and their tokenizer, then shards of each further length given
  stage prepare
  prep 1024 > "$OUT/prepare.log" 2>&1 || { tail -5 "$OUT/prepare.log"; exit 1; }
  local seq
  for seq in "$@"; do
    prep "$seq" "$DATA/stdlib-seq1024/tokenizer.model" >> "$OUT/prepare.log" 2>&1 || exit 1
  done
}
# `mtp train` on both GPUs of the machine
TRAIN2=($PY -m torch.distributed.run --standalone --nproc-per-node 2 -m pretrain train)

if part 1; then
  prepare
  prep 4096 "$DATA/stdlib-seq1024/tokenizer.model" >> "$OUT/prepare.log" 2>&1 &
  B=(benchmarks/bench_training.py --shapes 110m --steps 10 --warmup 4)
  stage "gpt-110m rows: this commit on GPU 0, $OLD on GPU 1"
  (
    export CUDA_VISIBLE_DEVICES=0
    $PY "${B[@]}" --data "$DATA" --rows "ours-none,ours-deepseek1" --json "$OUT/ab-new.json"
    $PY "${B[@]}" --data "$DATA" \
      --rows "ours-deepseek1+data.mask_cross_document=attention" --json "$OUT/docmask.json"
  ) > "$OUT/ab-new.log" 2>&1 &
  new=$!
  (
    export CUDA_VISIBLE_DEVICES=1
    cd "$OLD" && PYTHONPATH=$PWD:${PYTHONPATH:-} $PY "${B[@]}" --data "$WORK/old-data" \
      --rows "ours-none,ours-deepseek1" --json "$OUT/ab-old.json"
  ) > "$OUT/ab-old.log" 2>&1 &
  old=$!
  wait $new $old
  for f in ab-new ab-old; do echo "--- $f"; grep -E "^\|" "$OUT/$f.log" | tail -4; done
  grep -E "^\|" "$OUT/ab-new.log" | tail -2
  wait
  for spec in "selective 1" "full 2"; do
    set -- $spec
    stage "llama3-8b TP 2, sequence parallel, recompute $1, micro-batch $2"
    timeout 200 "${TRAIN2[@]}" \
      --config configs/llama3-8b.yaml run_dir="$WORK/run-8b-$1" \
      data.path="$DATA/stdlib-seq4096" data.num_workers=1 model.recompute="$1" \
      train.micro_batch_size="$2" train.global_batch_size=$((4 * $2)) train.steps=7 \
      optim.warmup_steps=2 checkpoint.interval=0 train.eval_interval=0 train.log_interval=1 \
      > "$OUT/8b-$1.log" 2>&1
    echo "exit $?"; keep "$OUT/8b-$1.log" | tail -5
  done
fi

if part 2; then
  prepare 2048
  stage "decoding engine (GPU 1) and gpt-1b checkpoint pauses (GPU 0)"
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 480 $PY benchmarks/bench_generation.py suite --out "$OUT/gen" --work "$WORK/gen" \
      --shapes 110m --data "$DATA/stdlib-seq1024" --train-steps 200 --requests 8 \
      --batch-sizes 1,8
  ) > "$OUT/gen.log" 2>&1 &
  gen=$!
  (
    export CUDA_VISIBLE_DEVICES=0
    [ "${AB:-1}" = 1 ] && (cd "$OLD" && PYTHONPATH=$PWD:${PYTHONPATH:-} $PY \
      benchmarks/bench_training.py --shapes 110m --steps 10 --warmup 4 --data "$WORK/old-data" \
      --rows "ours-none,ours-deepseek1" --json "$OUT/ab-old.json" > "$OUT/ab-old.log" 2>&1)
    train --config configs/gpt-1b.yaml run_dir="$WORK/run-1b" data.path="$DATA/stdlib-seq2048" \
      train.micro_batch_size=8 train.global_batch_size=16 train.steps=8 optim.warmup_steps=2 \
      checkpoint.interval=4 checkpoint.async_save=true checkpoint.keep_last=2
    du -sh "$WORK/run-1b/checkpoints"/*
    rm -rf "$WORK/run-1b/checkpoints"
  ) > "$OUT/ckpt-1b.log" 2>&1
  grep -E "^\|" "$OUT/ab-old.log" | tail -3
  keep "$OUT/ckpt-1b.log" | tail -12
  stage "gpt-350m: TP 2 → DP 2 ZeRO-1 on load, and offline conversion"
  T=("${TRAIN2[@]}" --config configs/gpt-350m.yaml data.path="$DATA/stdlib-seq2048"
     train.micro_batch_size=8 train.global_batch_size=16 train.steps=10 optim.warmup_steps=2
     train.eval_interval=0 train.log_interval=1 checkpoint.keep_last=3)
  "${T[@]}" run_dir="$WORK/run-350m" parallel.tp=2 checkpoint.interval=6 \
    > "$OUT/reshard.log" 2>&1
  "${T[@]}" run_dir="$WORK/run-350m-dp2" parallel.tp=1 checkpoint.interval=0 \
    --resume "$WORK/run-350m/checkpoints/step_00000006" >> "$OUT/reshard.log" 2>&1
  keep "$OUT/reshard.log" | tail -20
  ( time $PY -m pretrain checkpoint convert "$WORK/run-350m/checkpoints/step_00000006" \
      --layout tp=1,dp=2 --out "$WORK/350m-tp1" --no-progress ) > "$OUT/convert.log" 2>&1
  tail -5 "$OUT/convert.log"
  wait $gen
  grep -E "^\||device|speed" "$OUT/gen.log" | tail -12
fi
if part 3; then
  prepare 2048
  prep 4096 "$DATA/stdlib-seq1024/tokenizer.model" >> "$OUT/prepare.log" 2>&1 &
  B=(benchmarks/bench_training.py --shapes 110m --steps 10 --warmup 4 --rows ours-none,ours-deepseek1)
  stage "gpt-1b checkpoints, then this commit's rows (GPU 0); $OLD's rows (GPU 1)"
  (
    export CUDA_VISIBLE_DEVICES=0
    train --config configs/gpt-1b.yaml run_dir="$WORK/run-1b" data.path="$DATA/stdlib-seq2048" \
      train.micro_batch_size=8 train.global_batch_size=16 train.steps=9 optim.warmup_steps=2 \
      checkpoint.interval=3 checkpoint.async_save=true checkpoint.keep_last=1
    rm -rf "$WORK/run-1b/checkpoints"
    $PY "${B[@]}" --data "$DATA" --json "$OUT/ab-new.json" > "$OUT/ab-new.log" 2>&1
  ) > "$OUT/ckpt-1b.log" 2>&1 &
  new=$!
  (
    export CUDA_VISIBLE_DEVICES=1
    cd "$OLD" && PYTHONPATH=$PWD:${PYTHONPATH:-} $PY "${B[@]}" --data "$WORK/old-data" \
      --json "$OUT/ab-old.json"
  ) > "$OUT/ab-old.log" 2>&1 &
  old=$!
  wait $new $old
  keep "$OUT/ckpt-1b.log" | grep -E "checkpoint|step [0-9]/" | tail -12
  for f in ab-new ab-old; do echo "--- $f"; grep -E "^\| 110m" "$OUT/$f.log"; done
  wait
  stage "llama3-8b TP 2, sequence parallel, recompute selective, micro-batch 1, compile off"
  log=$OUT/8b-eager.log
  "${TRAIN2[@]}" \
    --config configs/llama3-8b.yaml run_dir="$WORK/run-8b-eager" train.compile=false \
    data.path="$DATA/stdlib-seq4096" data.num_workers=1 train.micro_batch_size=1 \
    train.global_batch_size=4 train.steps=50 optim.warmup_steps=2 checkpoint.interval=0 \
    train.eval_interval=0 train.log_interval=1 > "$log" 2>&1 &
  job=$!
  for _ in $(seq 240); do grep -q "step 6/50" "$log" && break; sleep 1; done
  # SIGKILL: a SIGTERM would make the run write its 8B checkpoint before exiting. The ranks die
  # with their launcher (pretrain/launch.py); pkill is the fallback.
  kill -9 $job 2>/dev/null; sleep 5; pkill -9 -f run-8b-eager; wait $job
  keep "$log" | grep -E "plan|step [0-9]/" | tail -4
fi
if part 4; then
  prepare 4096
  IFS=';' read -ra specs <<< "${SPECS:-selective 1 true;none 1 false;full 2 true}"
  for spec in "${specs[@]}"; do
    set -- $spec
    name=8b-$1-sp$3-micro$2-compile${COMPILE:-false}
    opts=(--config configs/llama3-8b.yaml model.recompute="$1" train.micro_batch_size="$2"
          train.global_batch_size=$((4 * $2)) parallel.sequence_parallel="$3")
    stage "llama3-8b TP 2, recompute $1, sequence parallel $3, micro-batch $2," \
      "compile ${COMPILE:-false}"
    $PY -m pretrain plan "${opts[@]}" --gpus 2 --seq-len 4096 > "$OUT/$name-plan.txt" 2>&1
    timeout 240 "${TRAIN2[@]}" \
      "${opts[@]}" run_dir="$WORK/run-$name" data.path="$DATA/stdlib-seq4096" \
      data.num_workers=1 train.compile="${COMPILE:-false}" train.steps=3 \
      train.memory_snapshot_steps=2 \
      optim.warmup_steps=2 checkpoint.interval=0 checkpoint.save_at_exit=false \
      train.eval_interval=0 train.log_interval=1 > "$OUT/$name.log" 2>&1
    echo "exit $?"; keep "$OUT/$name.log" | tail -4
    tail -3 "$OUT/$name-plan.txt"
    $PY benchmarks/memory_peak.py "$WORK/run-$name/memory/rank00000.pickle" --top 15 \
      | tee "$OUT/$name-peak.txt"
    rm -rf "$WORK/run-$name"
  done
fi
if part 5; then
  start=$SECONDS
  stamp() { while IFS= read -r l; do printf '%(%T)T %s\n' -1 "$l"; done; }
  prepare 4096
  prep 2048 "$DATA/stdlib-seq1024/tokenizer.model" > "$OUT/prepare-2048.log" 2>&1 &
  df -h "$WORK" | tail -1; free -g | head -2
  stage "llama3-8b TP 2, background checkpoint at step 10, compile off"
  log=$OUT/8b-async.log
  timeout 420 "${TRAIN2[@]}" \
    --config configs/llama3-8b.yaml run_dir="$WORK/run-8b-async" train.compile=false \
    data.path="$DATA/stdlib-seq4096" data.num_workers=1 train.micro_batch_size=2 \
    train.global_batch_size=8 train.steps=13 optim.warmup_steps=2 \
    checkpoint.interval=10 checkpoint.async_save=true checkpoint.keep_last=1 \
    checkpoint.save_at_exit=false train.eval_interval=0 train.log_interval=1 2>&1 | stamp > "$log"
  echo "exit ${PIPESTATUS[0]}"
  grep -E "host buffers|checkpoint|step [0-9]+/|error|Error" "$log" | grep -v "^\S* \[20" \
    | cut -c1-300 | tail -22
  du -sh "$WORK/run-8b-async/checkpoints"/* 2>/dev/null; df -h "$WORK" | tail -1
  rm -rf "$WORK/run-8b-async"
  wait
  left=$(( 570 - (SECONDS - start) ))
  stage "$left s left: gpt-350m causal vs document-masked (GPU 0), gpt-110m A/B (GPU 1)"
  if [ "$left" -gt 150 ] && [ "${NO350:-0}" = 0 ]; then
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout $((left - 10)) $PY benchmarks/bench_training.py --shapes 350m --steps 10 --warmup 4 \
        --data "$DATA" --json "$OUT/docmask-350m.json" \
        --rows "ours-deepseek1,ours-deepseek1+data.mask_cross_document=attention"
    ) > "$OUT/docmask-350m.log" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=1
      [ "${AB:-1}" = 1 ] || exit 0
      B=(benchmarks/bench_training.py --shapes 110m --steps 10 --warmup 4 --rows ours-none,ours-deepseek1)
      (cd "$OLD" && PYTHONPATH=$PWD:${PYTHONPATH:-} timeout $(( (left - 10) / 2 )) $PY "${B[@]}" \
        --data "$WORK/old-data" --json "$OUT/ab-old.json")
      timeout $(( (left - 10) / 2 )) $PY "${B[@]}" --data "$DATA" --json "$OUT/ab-new.json"
    ) > "$OUT/ab.log" 2>&1 &
    wait
    grep -E "^\|" "$OUT/docmask-350m.log" | tail -3
    grep -E "^\| 110m" "$OUT/ab.log"
  fi
fi
steady() {  # mean tokens/s, MFU and the last peak over the logged steps from $2 on, in log $1
  grep -E "step [0-9]+/" "$1" | grep -v "^\[20" | awk -v from="$2" '
    { split($2, s, "/"); if (s[1] + 0 < from) next
      for (i = 1; i <= NF; i++) { if ($i == "tok/s") { t = $(i-1); sub("k", "", t); tps += t; n++ }
                                  if ($i == "MFU") { m = $(i+1); sub("%", "", m); mfu += m }
                                  if ($i == "mem") peak = $(i+1) } }
    END { if (n) printf "steady %.1fk tokens/s, MFU %.1f%%, peak %s GiB (%d steps)\n",
                         tps / n, mfu / n, peak, n; else print "no steady steps logged" }'
}
if part 6; then
  prepare 4096
  IFS=';' read -ra specs <<< "${SPECS:-none 1 true 2 1;selective 2 true 2 1;full 1 true 2 1;selective 1 false 1 3}"
  for spec in "${specs[@]}"; do
    set -- $spec  # recompute micro sp tp zero [further overrides]
    name=8b-$1-micro$2-sp$3-tp$4-zero$5; extra=("${@:6}")
    [ ${#extra[@]} -gt 0 ] && name=$name-$(echo "${extra[*]##*.}" | tr ' =' '-_')
    opts=(--config configs/llama3-8b.yaml model.recompute="$1" train.micro_batch_size="$2"
          train.global_batch_size=$((4 * $2)) parallel.sequence_parallel="$3" parallel.tp="$4"
          parallel.zero_stage="$5" train.compile="${COMPILE:-auto}" "${extra[@]}")
    stage "llama3-8b $name"
    $PY -m pretrain plan "${opts[@]}" --gpus 2 --seq-len 4096 > "$OUT/$name-plan.txt" 2>&1
    timeout 220 "${TRAIN2[@]}" \
      "${opts[@]}" run_dir="$WORK/run-$name" data.path="$DATA/stdlib-seq4096" \
      data.num_workers=1 train.steps=7 optim.warmup_steps=2 checkpoint.interval=0 \
      checkpoint.save_at_exit=false train.eval_interval=0 train.log_interval=1 \
      > "$OUT/$name.log" 2>&1
    echo "exit $? ($(grep -m1 -o "out of GPU memory[^.]*" "$OUT/$name.log" || echo ok))"
    grep -E "step [12]/" "$OUT/$name.log" | grep -v "^\[20" | cut -c1-160  # loss, gradient norm
    steady "$OUT/$name.log" 4; grep -E "^total|^fits" "$OUT/$name-plan.txt"
    rm -rf "$WORK/run-$name"
  done
fi
if part 7; then
  prepare 2048
  G=(--config configs/gpt-1b.yaml data.path="$DATA/stdlib-seq2048" train.micro_batch_size=8
     train.global_batch_size=${GLOBAL_1B:-16} train.steps=12 optim.warmup_steps=2 checkpoint.interval=0
     checkpoint.save_at_exit=false train.eval_interval=0 train.log_interval=1)
  stage "gpt-1b MTP off and D=1 (GPU 0); gpt-110m gradient accumulation bf16 vs fp32 (GPU 1)"
  (
    export CUDA_VISIBLE_DEVICES=0
    for row in ${ONE_GPU-off d1}; do
      [ "$row" = off ] && train "${G[@]}" run_dir="$WORK/run-1b-off" mtp.kind=none mtp.depth=0 \
        > "$OUT/1b-off.log" 2>&1
      [ "$row" = d1 ] && train "${G[@]}" run_dir="$WORK/run-1b-d1" > "$OUT/1b-d1.log" 2>&1
    done
  ) &
  one=$!
  [ "${ACCUM_AB:-1}" = 1 ] && (
    export CUDA_VISIBLE_DEVICES=1
    for dtype in bf16 fp32; do
      $PY -m pretrain train --config configs/gpt-110m.yaml run_dir="$WORK/run-accum-$dtype" \
        data.path="$DATA/stdlib-seq1024" train.micro_batch_size=16 train.global_batch_size=64 \
        train.steps=200 optim.warmup_steps=20 train.grad_accum_dtype="$dtype" train.seed=7 \
        checkpoint.interval=0 checkpoint.save_at_exit=false train.eval_interval=0 \
        train.log_interval=10 > "$OUT/accum-$dtype.log" 2>&1
    done
  ) &
  two=$!
  wait $one
  for f in ${ONE_GPU-off d1}; do echo "--- 1b-$f"; steady "$OUT/1b-$f.log" 5; done
  [ "${ACCUM_AB:-1}" = 1 ] && wait $two && for dtype in bf16 fp32; do
    echo "--- grad accumulation $dtype"; steady "$OUT/accum-$dtype.log" 50
    grep -E "step [0-9]+/" "$OUT/accum-$dtype.log" | grep -v "^\[20" | awk '{print $2, $5}' \
      | tr '\n' ' '; echo
  done
  for zero in 1 2; do
    stage "gpt-1b DP 2, ZeRO-$zero, global batch ${GLOBAL_1B:-16}"
    "${TRAIN2[@]}" "${G[@]}" \
      run_dir="$WORK/run-1b-dp2-z$zero" parallel.zero_stage=$zero > "$OUT/1b-dp2-z$zero.log" 2>&1
    echo "exit $?"; steady "$OUT/1b-dp2-z$zero.log" 5
  done
  rm -rf "$WORK"/run-1b-* "$WORK"/run-accum-*
fi
if part 8; then
  prepare 4096
  for layers in ${LAYERS:-2 4}; do
    name=70b-$layers-layers
    opts=(--config configs/llama3-70b.yaml model.num_layers=$layers parallel.tp=2 parallel.pp=1
          parallel.sequence_parallel=true model.recompute=selective train.micro_batch_size=1
          train.global_batch_size=4)
    stage "llama3-70b truncated to $layers layers, TP 2"
    $PY -m pretrain plan "${opts[@]}" --gpus 2 --seq-len 4096 > "$OUT/$name-plan.txt" 2>&1
    timeout 240 "${TRAIN2[@]}" \
      "${opts[@]}" run_dir="$WORK/run-$name" data.path="$DATA/stdlib-seq4096" \
      data.num_workers=1 train.compile=false train.steps=3 optim.warmup_steps=2 \
      checkpoint.interval=0 checkpoint.save_at_exit=false train.eval_interval=0 \
      train.log_interval=1 > "$OUT/$name.log" 2>&1
    echo "exit $?"; steady "$OUT/$name.log" 2; cat "$OUT/$name-plan.txt"
    rm -rf "$WORK/run-$name"
  done
fi
if part 9; then
  prepare
  stage "decoding engine at TP 2 (gpt-110m, both GPUs)"
  timeout "${GEN_TIMEOUT:-420}" $PY benchmarks/bench_generation.py suite --out "$OUT/gen-tp2" \
    --work "$WORK/gen-tp2" --shapes 110m --tp2-only --data "$DATA/stdlib-seq1024" \
    --train-steps 200 --requests 16 > "$OUT/gen-tp2.log" 2>&1
  echo "exit $?"; grep -E "^\||device|speed|Error" "$OUT/gen-tp2.log" | tail -12
fi
if part 10; then
  prepare
  stage "gradient parity: gpt-110m, the same 8 sequences a step under each layout"
  # The first step's gradient norm must agree across layouts and compile modes (bf16: to ~1 %);
  # at 8B, compiled sequence-parallel blocks gave 2.17 where eager ones gave 60.1.
  IFS=';' read -ra specs <<< "${SPECS:-2 true true;2 true false;2 false true;1 false true;1 false false;1 false true train.grad_accum_dtype=fp32 train.micro_batch_size=2;1 false true train.micro_batch_size=2}"
  for spec in "${specs[@]}"; do
    set -- $spec  # tp sp compile [further overrides]
    name=parity-tp$1-sp$2-compile$3; extra=("${@:4}")
    [ ${#extra[@]} -gt 0 ] && name=$name-$(echo "${extra[*]##*.}" | tr ' =' '-_')
    timeout 150 "${TRAIN2[@]}" --config configs/gpt-110m.yaml run_dir="$WORK/run-$name" \
      data.path="$DATA/stdlib-seq1024" parallel.tp="$1" parallel.sequence_parallel="$2" \
      train.compile="$3" train.micro_batch_size=4 train.global_batch_size=8 "${extra[@]}" \
      train.steps=3 optim.warmup_steps=2 checkpoint.interval=0 checkpoint.save_at_exit=false \
      train.eval_interval=0 train.log_interval=1 > "$OUT/$name.log" 2>&1
    echo "$name (exit $?): $(grep -E "step [1-3]/" "$OUT/$name.log" | grep -v "^\[20" \
      | awk -F'|' '{gsub(/ /, "", $2); gsub(/ /, "", $7); printf "%s %s  ", $2, $7}')"
    rm -rf "$WORK/run-$name"
  done
fi
stage done
