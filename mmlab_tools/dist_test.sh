#!/usr/bin/env bash
# Distributed evaluation with torchrun: dist_test.sh CONFIG CHECKPOINT NGPUS [test.py args...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node.
# Without CUDA, NGPUS CPU processes evaluate with the gloo backend.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NGPUS [test.py arguments]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NGPUS=$3
shift 3
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$NGPUS" test.py "$CONFIG" "$CHECKPOINT" "$@"
