#!/usr/bin/env python
"""Secure-inference client (P0): holds the images, learns only the model's outputs.

The command lives in :mod:`secure_inference.cli.client`,
also installed as ``si-client``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.client import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
