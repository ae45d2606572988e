#!/usr/bin/env bash
# Sets up .venv with the project installed (editable). Idempotent: a second run only checks.
#   scripts/setup.sh          runtime dependencies (training, data preparation)
#   scripts/setup.sh --dev    plus the test/lint tools and the Hugging Face interop extra
# PYTHON selects the interpreter (default python3; 3.11 or 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "${1:-}" in
  --dev) extras="[dev,hf]" ;;
  "") ;;
  -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
  *) echo "setup.sh: unknown option '$1' (use --dev or nothing)" >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first and pinned: an unpinned torch pulled in by a dependency would fetch a multi-GB
# CUDA build even on CPU machines. Clusters that already ship a torch in the venv keep theirs.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch ${TORCH_VERSION:=2.13.0}"
  "${pip[@]}" "torch==${TORCH_VERSION}"
fi
echo "setup: installing the project ${extras:-(runtime only)}"
"${pip[@]}" -e ".${extras}"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
