#!/usr/bin/env bash
# Shared launcher of dist_train.sh and dist_test.sh: torchrun.sh NGPUS SCRIPT [SCRIPT args...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node; PYTHON picks the
# interpreter. Without CUDA the NGPUS processes run on CPU with the gloo backend.
set -euo pipefail
NGPUS=$1
SCRIPT=$2
shift 2
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$NGPUS" \
    --master_port="${PORT:-29500}" \
    "$HERE/$SCRIPT" "$@" --launcher pytorch
