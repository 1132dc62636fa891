#!/usr/bin/env bash
# Multi-node launch: torchrun with c10d rendezvous. Run this on every node of the job.
#
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0.example:29500 RDZV_ID=exp1 \
#       bash launch/multinode.sh --root /shared/ckpt/exp1 --steps 1000
#
# Variables:
#   NNODES          number of nodes (required)
#   RDZV_ENDPOINT   host:port of the rendezvous store, reachable from every node (required);
#                   the node whose address it names hosts the store
#   NPROC_PER_NODE  ranks per node (default 1)
#   RDZV_ID         a job id shared by all nodes (default distckpt); a fresh one per job
#   MAX_RESTARTS    torchrun's restarts of failed workers (default 0). Not relied on: on
#                   torch 2.13 with gloo, restarted workers can fail or hang in torch's own
#                   init_process_group; restart the whole job instead (it resumes from `last`)
#   SCRIPT          the training script (default: train.py next to this script); arguments
#                   go to it; a relative --root is relative to the current directory
#   PYTHON          the interpreter (default python3)
#   DRY_RUN=1       print the command instead of running it
# The checkpoint root must be on a filesystem every node shares.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of the rendezvous store}"
cmd=(
  "${PYTHON:-python3}" -m torch.distributed.run
  --nnodes "$NNODES"
  --nproc-per-node "${NPROC_PER_NODE:-1}"
  --rdzv-backend c10d
  --rdzv-endpoint "$RDZV_ENDPOINT"
  --rdzv-id "${RDZV_ID:-distckpt}"
  --max-restarts "${MAX_RESTARTS:-0}"
  "${SCRIPT:-$(dirname "$0")/train.py}" "$@"
)
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${cmd[@]}"
