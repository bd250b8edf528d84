#!/usr/bin/env python
"""Evaluate a (finetuned) checkpoint of an mmpretrain/mmseg config.

The command lives in :mod:`secure_inference.cli.mmlab_test`,
also installed as ``si-test``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.mmlab_test import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
