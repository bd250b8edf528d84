#!/usr/bin/env python
"""Secure-inference crypto provider / helper (P2): needs only the public architecture and spec.

The command lives in :mod:`secure_inference.cli.crypto_provider`,
also installed as ``si-crypto-provider``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.crypto_provider import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
