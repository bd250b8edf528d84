#!/usr/bin/env bash
# One command for the GPU checks of the secure runtime (issue 16), on a machine that has
# PyTorch with CUDA, numpy, numba and pytest but not this project's other dependencies.
#
#   bash benchmark/secure_inference/gpu_wheels.sh      # where pip works: wheels into .whl/
#   bash benchmark/secure_inference/gpu_check.sh       # on the GPU machine, .whl/ carried
#
# With .whl/ present its wheels are installed into /tmp/si-site first (pip --no-index: no
# network needed). Without it, `cryptography` must be installed; MMLab is optional (without
# it the whole-network tests and the ResNet benchmark are skipped and the script says so).
#
# Stages, in order of importance, each under its own time limit so that one slow stage
# cannot eat the others' time (GPU_CHECK_STAGES="tests networks ..." runs a subset):
#   tests       every CUDA unit test: limb convolutions, linear and non-linear protocols,
#               ChaCha20 (torch and the fused Triton kernel), mod-67 sampling on the GPU, a
#               mixed CPU/GPU session, chacha20 parties drawing on the device
#   networks    the four reference architectures on CUDA against plaintext and the CPU bytes
#   throughput  secure DReLU/ReLU throughput at 1e6 and 1e7 on cuda and the CPUs
#   resnets     bench.py: ResNet18-CIFAR-100 and ResNet50-224, all ReLUs and 6%, on cuda at
#               batch 1, 8, 32 (with the loopback bandwidth each row's wire bound is computed
#               from) and on the CPUs at batch 1 (chacha20)
#   large       throughput at 1e8 on cuda
#   kernels     keystream (bench_prg.py) and link (bench_links.py) benchmarks
# The whole run keeps within GPU_CHECK_BUDGET seconds (default 540: one 10-minute command of
# the device tool with room to spare): a stage gets at most what is left, and stages that
# would get under 30 s are skipped and named. Logs and JSON go to $OUT (default
# benchmark/secure_inference/gpu_check); the exit status is non-zero if a test stage failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmark/secure_inference/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STAGES="${GPU_CHECK_STAGES:-tests networks throughput resnets large kernels}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/si-site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/si-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import cryptography" 2>/dev/null || {
  echo "gpu_check: the 'cryptography' package is missing: run gpu_wheels.sh where pip works" \
       "and carry .whl/, or pip install cryptography" >&2; exit 2; }
python3 - <<'PY' | tee "$LOG"
import datetime, os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
try:
    import triton
    tri = triton.__version__
except ImportError:
    tri = "not installed"
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  python "
      f"{platform.python_version()}  torch {torch.__version__}  triton {tri}  GPU: {gpu}  "
      f"CPU cores: {os.cpu_count()}")
if gpu == "none":
    print("gpu_check: no CUDA device: the CUDA tests will be skipped, the GPU stages too")
PY
HAVE_CUDA=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
HAVE_MMLAB=$(python3 -c "import mmpretrain, mmseg" >/dev/null 2>&1 && echo 1 || echo 0)
FAILED=0

BUDGET="${GPU_CHECK_BUDGET:-540}"
stage() {   # stage NAME SECONDS IS_TEST COMMAND...
  local name=$1 limit=$2 is_test=$3
  shift 3
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, the time budget (${BUDGET} s) is spent" | tee -a "$LOG"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ] && [ "$is_test" = 1 ]; then FAILED=1; fi
}

stage tests 150 1 python3 -m pytest -m cuda -p no:cacheprovider -q -rs \
  tests/mpc/test_backends.py tests/mpc/test_linear.py tests/mpc/test_nonlinear.py \
  tests/mpc/test_chacha.py tests/mpc/test_chacha_triton.py tests/mpc/test_prg.py \
  tests/mpc/test_pair_random.py tests/mpc/test_devices.py tests/test_brelu.py
if [ "$HAVE_MMLAB" = 1 ]; then
  stage networks 180 1 python3 -m pytest -m cuda -p no:cacheprovider -q -rs \
    tests/mpc/test_secure_inference.py
else
  echo "gpu_check: MMLab is not importable: whole-network CUDA tests and ResNet benchmarks" \
       "skipped (run gpu_wheels.sh where pip works and carry .whl/)" | tee -a "$LOG"
fi
if [ "$HAVE_CUDA" != 1 ]; then
  echo "gpu_check: no CUDA device: GPU benchmarks skipped" | tee -a "$LOG"
  exit $FAILED
fi
stage throughput 120 0 python3 benchmark/secure_inference/bench.py --only-throughput \
  --devices cuda cpu --prg chacha20 --throughput-sizes 1e6 1e7 --out "$OUT/gpu_throughput.json"
if [ "$HAVE_MMLAB" = 1 ]; then
  stage resnets 240 0 bash -c "python3 benchmark/secure_inference/bench.py --resnet50 \
    --devices cuda --batch-sizes 1 8 32 --prg chacha20 --link-mb 256 \
    --out '$OUT/gpu_networks.json' && python3 benchmark/secure_inference/bench.py --resnet50 \
    --devices cpu --batch-sizes 1 --prg chacha20 --out '$OUT/gpu_networks.json'"
fi
stage large 90 0 python3 benchmark/secure_inference/bench.py --only-throughput \
  --devices cuda --prg chacha20 --throughput-sizes 1e8 --out "$OUT/gpu_throughput.json"
stage kernels 90 0 bash -c "python3 benchmark/mpc/bench_prg.py --sizes-mb 1 16 64 \
  --repeats 2 && python3 benchmark/mpc/bench_links.py --size-mb 256 --frame-mb 8 --repeats 2"
echo "gpu_check: done; test stages $([ $FAILED = 0 ] && echo passed || echo FAILED); logs and" \
     "results in $OUT" | tee -a "$LOG"
exit $FAILED
