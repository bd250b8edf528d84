#!/usr/bin/env python
"""TLS certificates for the three secure-inference parties (client, server, helper).

The command lives in :mod:`secure_inference.cli.make_certificates`,
also installed as ``si-certificates``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.make_certificates import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
