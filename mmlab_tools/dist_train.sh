#!/usr/bin/env bash
# Distributed training with torchrun: dist_train.sh CONFIG NGPUS [train.py args...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node.
# Without CUDA, NGPUS CPU processes train with the gloo backend.
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG NGPUS [train.py arguments]" >&2
    exit 2
fi
CONFIG=$1
NGPUS=$2
shift 2
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$NGPUS" train.py "$CONFIG" "$@"
