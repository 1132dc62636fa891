#!/usr/bin/env bash
# Run launch/train.py on this machine under torchrun: NPROC ranks joined by gloo on CPU.
# Every argument goes to train.py, e.g. `bash launch/run_local.sh --root runs/exp1 --steps 500`.
#
# Environment:
#   NPROC            ranks to start (default 2)
#   SCRIPT           the training script (default launch/train.py; e.g. launch/train_fsdp.py)
#   PYTHON           the interpreter that has torch and distckpt (default python3)
#   OMP_NUM_THREADS  threads per rank (default 1: ranks share this machine's cores, and the
#                    same value across restarts keeps a resumed run bit-exact)
#
# `exec` makes torchrun this script's process: `kill -TERM <pid of this script>` reaches the
# torchrun agent, which forwards SIGTERM to every rank (a preemption save, then exit).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# `python -m torch.distributed.run` is torchrun, from the interpreter that has torch.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
  "${SCRIPT:-$(dirname "$0")/train.py}" "$@"
