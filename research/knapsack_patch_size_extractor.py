#!/usr/bin/env python
"""Choose a Block-ReLU patch size for every channel under a DReLU budget (exact knapsack).

The command lives in :mod:`secure_inference.cli.knapsack_patch_size_extractor`,
also installed as ``si-knapsack``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.knapsack_patch_size_extractor import main, build_parser  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
