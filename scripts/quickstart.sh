#!/usr/bin/env bash
# The main job, end to end on a fresh machine (CPU if there is no GPU):
#   1. set up .venv (scripts/setup.sh)
#   2. build a dataset from the Python standard library (tokenizer + packed shards)
#   3. train configs/tiny-cpu.yaml (DeepSeek MTP, D = 2), resuming if a checkpoint exists
#   4. export the main model as a Hugging Face Llama checkpoint, with the MTP draft beside it
#   5. generate a short continuation with the export, plainly and self-speculatively (the MTP
#      draft at work: tokens per main-model forward, acceptance by draft depth)
# Extra arguments are config overrides for step 3, e.g. `scripts/quickstart.sh train.steps=50`.
# MTP_DATA_DIR / MTP_RUN_DIR move the dataset (default data/stdlib-tiny) and run (runs/tiny-cpu);
# MTP_SKIP_SETUP=1 reuses the existing .venv as is.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${MTP_DATA_DIR:-data/stdlib-tiny}
run=${MTP_RUN_DIR:-runs/tiny-cpu}

[ "${MTP_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
mtp=.venv/bin/mtp
echo "== 1/4 dataset: $data"
"$mtp" prepare --source stdlib --out "$data" --vocab-size 4096 --seq-len 128 --max-depth 4
echo "== 2/4 training: $run"
"$mtp" train --config configs/tiny-cpu.yaml data.path="$data" run_dir="$run" "$@" --resume auto
echo "== 3/4 export: $run/export"
"$mtp" export "$run" --out "$run/export" --with-mtp --overwrite
echo "== 4/4 generate: plain, then self-speculative with the MTP draft"
"$mtp" generate "$run/export" --prompt "import os" --prompt "def main(args):" \
  --max-new-tokens 48 --compare
echo "done: checkpoints in $run/checkpoints, TensorBoard: .venv/bin/tensorboard --logdir $run/tensorboard, model in $run/export"
