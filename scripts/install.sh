#!/usr/bin/env bash
# Install distckpt (editable) with its test extra. Installs the CPU build of torch first when
# no torch is present: a plain `pip install torch==V` from PyPI is, on Linux x86-64, the
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${DISTCKPT_TORCH_VERSION:-2.13.0}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "torch is missing: installing the CPU build of torch ${TORCH_VERSION}"
  # The CPU build's own version, V+cpu, first: a package source that mirrors PyTorch's CPU
  # wheels serves it under that name. PyPI has no such version (it refuses local versions),
  # so there the install falls back to PyTorch's CPU index, where V is the CPU build.
  if ! "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION}+cpu"; then
    echo "installing torch==${TORCH_VERSION}+cpu failed: installing torch ${TORCH_VERSION} from PyTorch's CPU index"
    "$PYTHON" -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu \
      "torch==${TORCH_VERSION}"
  fi
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
