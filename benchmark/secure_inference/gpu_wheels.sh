#!/usr/bin/env bash
# Wheels a GPU machine without network needs for gpu_check.sh, downloaded here into .whl/ (git
# ignores it; about 12 MB): `cryptography` (the secure runtime's ciphers and TLS) and MMLab
# (mmengine, mmcv-lite, mmpretrain, mmsegmentation: the whole-network CUDA tests and the
# ResNet benchmarks build their models from MMLab configs), with the dependencies a typical
# PyTorch image lacks. Versions are this project's pins (constraints.txt).
#
#   bash benchmark/secure_inference/gpu_wheels.sh [PYTHON_VERSION]   # default 3.12
#
# Then take .whl/ along to the GPU machine (next to the repository) and run gpu_check.sh
# there: it installs them into /tmp/si-site (pip --no-index, nothing downloaded there).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER="${1:-3.12}"
PACKAGES=(cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
          mmengine==0.10.7 mmcv-lite==2.1.0 mmpretrain==1.2.0 mmsegmentation==1.2.2
          addict==2.4.0 yapf==0.43.0 platformdirs==4.14.7 termcolor==3.3.0 ftfy==6.3.1
          wcwidth==0.9.4 prettytable==3.18.0 mat4py==0.6.0 modelindex==0.0.2
          model-index==0.1.11 ordered-set==4.1.0 importlib_metadata==10.2.0)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 any; do
  PLATFORMS+=(--platform "$tag")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
echo "gpu_wheels: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)) for Python $PYVER"
