#!/usr/bin/env python
"""Measure the distortion of every (ReLU site, channel, candidate block size) of a model.

The command lives in :mod:`secure_inference.cli.extract_block_sizes`,
also installed as ``si-extract``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.extract_block_sizes import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
