"""Installs the secure_inference library (``pip install -e .`` for development).

``install_requires`` states the *ranges* the library supports, so installing it into an
existing environment (say torch 2.11 with CUDA on Python 3.12) keeps that environment's torch.
The exact versions CI and ``make test``/``make demo`` use are pinned in requirements.txt and
constraints.txt, which the Makefile installs first.

Checked on 2026-12-01 (2-core CPU machine, Python 3.11): in a fresh virtual environment holding
torch 2.11.0 and torchvision 0.26.0 (the PyPI +cu130 wheels, run on the CPU), ``pip install -e
".[test,mmlab]"`` installed the other dependencies and left torch and torchvision as they were,
and the core tests passed with that torch: tests/mpc, tests/knapsack, tests/distortion and
tests/test_{brelu,spec,sites,candidates,conversions}.py, 686 passed and 14 skipped (CUDA).
torch 2.11 is the oldest version exercised; CI runs everything with the pins (torch 2.13).

Editable installs: use ``pip install -e . --config-settings editable_mode=compat`` (what
``make install`` does). In setuptools' default editable mode the library is found by an import
hook that runs after the path search, so a script in research/ sees the folder
research/secure_inference/ first; the research/ scripts then stop with that advice.
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.11,<3",          # int64 conv2d/matmul wrap exactly mod 2^64 on CPU; meta tensors
    "torchvision>=0.26",       # torchvision model names in the CLIs (built without weights)
    "numpy>=1.26,<3",
    "numba>=0.60",             # DReLU kernels on CPU
    "cryptography>=42",        # AES-CTR / ChaCha20 randomness, X25519 + HKDF, TLS certificates
    "tqdm>=4.60",              # progress bars in the CLIs
    "matplotlib>=3.7",         # report and knapsack plots
    "scipy>=1.11",
    "PyYAML>=6",               # session files of the secure-inference CLIs
]
MMLAB = [                      # finetuning and MMLab configs (mmseg asserts mmcv < 2.2)
    "mmengine>=0.10,<0.11",
    "mmcv-lite>=2.0,<2.2",
    "mmsegmentation>=1.2,<1.3",
    "mmpretrain>=1.2,<1.3",
    "ftfy", "regex",           # mmsegmentation imports them without declaring them
]

setup(
    name="secure-inference",
    version="0.1.0",
    description="ReLU-efficient private CNN inference: Block-ReLU with knapsack-chosen patch sizes "
                "and a three-party secure runtime.",
    python_requires=">=3.10",
    packages=find_packages(include=["secure_inference", "secure_inference.*"]),
    install_requires=CORE,
    extras_require={"mmlab": MMLAB, "demo": ["scikit-learn>=1.3"],
                    "test": ["pytest>=8", "pytest-timeout>=2.2"]},
    # the command lines (secure_inference/cli); research/*.py and mmlab_tools/*.py run the same
    entry_points={"console_scripts": [
        "si-extract = secure_inference.cli.extract_block_sizes:main",
        "si-knapsack = secure_inference.cli.knapsack_patch_size_extractor:main",
        "si-server = secure_inference.cli.server:main",
        "si-client = secure_inference.cli.client:main",
        "si-crypto-provider = secure_inference.cli.crypto_provider:main",
        "si-certificates = secure_inference.cli.make_certificates:main",
        "si-calibrate = secure_inference.cli.calibrate:main",
        "si-compare = secure_inference.cli.compare_methods:main",
        "si-train = secure_inference.cli.mmlab_train:main",
        "si-test = secure_inference.cli.mmlab_test:main",
    ]},
)
