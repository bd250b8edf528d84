#!/usr/bin/env bash
# The Fashion-MNIST accuracy study (benchmark/accuracy/README.md), resumable end to end:
# rerun the same command after an interruption and it continues where it stopped.
#
#   bash benchmark/accuracy/run_study.sh            # from the repository root
#
# 1. data      the four IDX files, decompressed into $FMNIST_DATA (default: an ignored folder,
#              work_dirs/data/fashion-mnist) from $FMNIST_SRC (Debian's dataset-fashion-mnist:
#              /usr/share/datasets/fashion-mnist/*.gz; or the same files from the project)
# 2. baseline  20 epochs of benchmark/accuracy/fmnist_resnet18.py (resumes from its last epoch)
# 3. compare   research/compare_methods.py at the budgets of the uniform 7x7, 4x4, 3x3, 2x2
#              specs: 3 seeds for knapsack, uniform, linearisation; 1 for the others
# Two finetunes at a time (JOBS=2), one torch thread each, while the main process builds the
# specs: the 2-core machine busy, nothing oversubscribed for long. Outputs: $WORK (default
# work_dirs/fmnist_study); results.json / results.md / the plot are copied next to this script.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-.venv/bin/python}"
export FMNIST_DATA="${FMNIST_DATA:-$REPO/work_dirs/data/fashion-mnist}"
FMNIST_SRC="${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}"
WORK="${WORK:-$REPO/work_dirs/fmnist_study}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HERE=benchmark/accuracy
log() { echo "[study $(date +%H:%M:%S)] $*"; }

mkdir -p "$FMNIST_DATA" "$WORK"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ ! -s "$FMNIST_DATA/$f" ]; then
    [ -f "$FMNIST_SRC/$f.gz" ] || { echo "missing $FMNIST_SRC/$f.gz: apt-get install dataset-fashion-mnist, or set FMNIST_SRC" >&2; exit 2; }
    gunzip -c "$FMNIST_SRC/$f.gz" > "$FMNIST_DATA/$f.tmp" && mv "$FMNIST_DATA/$f.tmp" "$FMNIST_DATA/$f"
  fi
done
log "data in $FMNIST_DATA"

BASE="$WORK/baseline"
if [ ! -f "$BASE/baseline.pth" ]; then
  resume=()
  [ -f "$BASE/last_checkpoint" ] && resume=(--resume)
  log "baseline: training $HERE/fmnist_resnet18.py (log: $BASE/train.log)"
  mkdir -p "$BASE"
  "$PY" mmlab_tools/train.py "$HERE/fmnist_resnet18.py" --work-dir "$BASE" "${resume[@]}" >> "$BASE/train.log" 2>&1
  cp "$(cat "$BASE/last_checkpoint")" "$BASE/baseline.pth"
fi
log "baseline: $BASE/baseline.pth"

"$PY" research/compare_methods.py "$HERE/fmnist_resnet18_finetune.py" "$BASE/baseline.pth" \
  --work-dir "$WORK/compare" --threads 1 --jobs "${JOBS:-2}" --num-samples 256 \
  --iterative-rounds 2 --iterative-samples 64 \
  --budgets 7x7 4x4 3x3 2x2 \
  --methods knapsack uniform linearisation knapsack_linear knapsack_kd iterative \
  --seeds 0 1 2 --max-seeds knapsack_linear=1 knapsack_kd=1 iterative=1
cp "$WORK/compare/results.json" "$WORK/compare/results.md" "$WORK/compare/accuracy_vs_drelus.png" "$HERE/"
log "done; results copied to $HERE/"
