#!/usr/bin/env bash
# Install distckpt (editable) with its test extra. Installs the CPU build of torch first when
# no torch is present, because an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "torch is missing: installing the CPU build torch==${DISTCKPT_TORCH_VERSION:-2.13.0}"
  "$PYTHON" -m pip install --quiet "torch==${DISTCKPT_TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
