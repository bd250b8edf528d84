#!/usr/bin/env bash
# One command for the GPU checks of the secure runtime (issue 16): every CUDA test of the
# project, on a machine that has PyTorch with CUDA, numpy, numba and pytest but not this
# project's other dependencies (no MMLab needed). The only extra package is `cryptography`
# (pip install cryptography, or carry its wheel: see the device notes in the repository docs).
#
#   bash benchmark/secure_inference/gpu_check.sh            # from the repository root or anywhere
#
# It prints the machine, runs the CUDA tests (limb convolutions, linear and non-linear
# protocols, ChaCha20 (torch and the fused Triton kernel) and mod-67 sampling on the GPU, a
# mixed CPU/GPU session, chacha20 parties drawing on the device), the randomness and link
# benchmarks, and exits non-zero if any test fails. Without a GPU the CUDA tests skip and the script says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import cryptography" 2>/dev/null || {
  echo "gpu_check: the 'cryptography' package is missing (pip install cryptography)" >&2; exit 2; }
python3 - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}  torch {torch.__version__}  GPU: {gpu}")
if gpu == "none":
    print("gpu_check: no CUDA device: the CUDA tests below will be skipped")
PY
python3 -m pytest -m cuda -p no:cacheprovider -q -rs \
  tests/mpc/test_backends.py tests/mpc/test_linear.py tests/mpc/test_nonlinear.py \
  tests/mpc/test_chacha.py tests/mpc/test_chacha_triton.py tests/mpc/test_prg.py tests/mpc/test_pair_random.py \
  tests/mpc/test_devices.py tests/test_brelu.py
python3 benchmark/mpc/bench_prg.py --sizes-mb 1 16 64 --repeats 2
python3 benchmark/mpc/bench_links.py --size-mb 256 --frame-mb 8 --repeats 2
# secure DReLU/ReLU throughput on the GPU and on this machine's CPUs, chacha20 drawn on the
# device, and the loopback bandwidth the wire bound is computed from (no MMLab needed)
OUT="${OUT:-benchmark/secure_inference}"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device: GPU benchmark skipped"; exit 0
fi
python3 benchmark/secure_inference/bench.py --only-throughput --devices cpu cuda \
  --prg chacha20 --throughput-sizes 1e6 1e7 --link-mb 256 --out "$OUT/gpu_throughput.json"
python3 benchmark/secure_inference/bench.py --only-throughput --devices cuda \
  --prg chacha20 --throughput-sizes 1e8 --out "$OUT/gpu_throughput.json"
