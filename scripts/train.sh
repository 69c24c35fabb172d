#!/usr/bin/env bash
# Launch training with torchrun, on one node or several (docs/training.md, "Launching").
#
#   bash scripts/train.sh CONFIG.yaml [--group.key=value ...]
#
# One node: every GPU of this machine (or NPROC_PER_NODE processes), a free rendezvous port:
#   bash scripts/train.sh configs/pretrain/qwen2_5_coder_0_5b_opendcoder.yaml
# Several nodes: run the same command on every node, changing only NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash scripts/train.sh CONFIG.yaml  # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash scripts/train.sh CONFIG.yaml  # node 1
# MASTER_ADDR is node 0's address, reachable from every node; the global rank of a process is
# NODE_RANK * NPROC_PER_NODE + its local rank.
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1; required when NNODES > 1]
#   MASTER_PORT [a free port on one node; 29500 on several]
#   NPROC_PER_NODE [the number of visible CUDA GPUs, 1 without any]
#   PYTHON [python3]  TRAIN_SCRIPT [tasks/train_torch.py of this checkout]
# Slurm: scripts/slurm/train.sbatch.
set -euo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash scripts/train.sh CONFIG.yaml [--group.key=value ...]  (see the top of this file)" >&2
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO/tasks/train_torch.py}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "${NPROC_PER_NODE:-0}" -lt 1 ]; then NPROC_PER_NODE=1; fi
fi
for v in NNODES NODE_RANK NPROC_PER_NODE; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then echo "train.sh: $v=${!v} is not a number" >&2; exit 2; fi
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "train.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES (ranks count from 0)" >&2; exit 2
fi

if [ "$NNODES" -eq 1 ]; then
  # One node: c10d rendezvous on localhost; port 0 lets torchrun pick a free one unless given.
  RDZV=(--rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-0}")
else
  if [ -z "${MASTER_ADDR:-}" ]; then
    echo "train.sh: NNODES=$NNODES needs MASTER_ADDR (the address of the NODE_RANK=0 node, the same on every node)" >&2
    exit 2
  fi
  # Static rendezvous: node ranks are fixed by NODE_RANK; node 0 hosts the store on MASTER_PORT.
  RDZV=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}")
fi

CMD=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${RDZV[@]}"
     "$TRAIN_SCRIPT" "$@")
echo "[train.sh] node $NODE_RANK/$NNODES: ${CMD[*]}" >&2
exec "${CMD[@]}"
