"""Installs the secure_inference library (``pip install -e .`` for development)."""
from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")
            and not ln.startswith("pytest")]


setup(
    name="secure-inference",
    version="0.1.0",
    description="ReLU-efficient private CNN inference: Block-ReLU with knapsack-chosen patch sizes "
                "and a three-party secure runtime.",
    python_requires=">=3.10",
    packages=find_packages(include=["secure_inference", "secure_inference.*"]),
    install_requires=_requirements(),
    extras_require={"test": ["pytest==9.2.0", "pytest-timeout==2.4.0"]},
)
