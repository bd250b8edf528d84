#!/usr/bin/env python
"""Secure-inference server (P1): holds the model weights; never sees the client's images.

The command lives in :mod:`secure_inference.cli.server`,
also installed as ``si-server``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.server import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
