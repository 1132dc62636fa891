#!/usr/bin/env bash
# The demo: install distckpt, train a toy model on 2 ranks with checkpoints in runs/demo (under
# the repository), then show the checkpoint root and what `last` points at. Running it again
# resumes from runs/demo/last (and finishes at once once training is done); `rm -rf runs/demo`
# starts over. Extra arguments go to train.py, e.g. `bash launch/demo.sh --sleep 0.05`.
#
# Environment: PYTHON (default python3), OMP_NUM_THREADS (default 1); NPROC is fixed to 2 here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
NPROC=2 bash launch/run_local.sh --root runs/demo "$@"

echo
echo "== ls -la runs/demo"
ls -la runs/demo
# `last` is a relative symlink, or a one-line pointer file where symlinks are not allowed.
if [ -L runs/demo/last ]; then
  target="$(readlink runs/demo/last)"
else
  target="$(head -n 1 runs/demo/last)"
fi
echo
echo "== last -> $target"
ls -la "runs/demo/$target"
