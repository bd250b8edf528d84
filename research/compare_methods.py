#!/usr/bin/env python
"""Accuracy against DReLUs: several ways of spending the same DReLU budget, side by side.

The command lives in :mod:`secure_inference.cli.compare_methods`; this path keeps working with
every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.compare_methods import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
