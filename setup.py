"""Installs the secure_inference library (``pip install -e .`` for development).

``install_requires`` states the *ranges* the library supports, so installing it into an
existing environment (say torch 2.11 with CUDA on Python 3.12) keeps that environment's torch.
The exact versions CI and ``make test``/``make demo`` use are pinned in requirements.txt and
constraints.txt, which the Makefile installs first. Oldest versions exercised: torch 2.11 (the
GPU machine's, secure runtime and CUDA tests) and torch 2.13 (everything, CI).
Checked with pip's resolver on 2026-12-01: ``pip install --dry-run -e .`` in a virtual
environment that holds torch 2.11.0 and torchvision 0.26.0 installs the other dependencies and
leaves torch and torchvision as they are (the exact pins this file used to declare replaced
them).
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
        "si-train = secure_inference.cli.mmlab_train:main",
        "si-test = secure_inference.cli.mmlab_test:main",
    ]},
)
