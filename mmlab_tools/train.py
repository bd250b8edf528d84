#!/usr/bin/env python
"""Train or finetune an mmpretrain/mmseg config, optionally with Block-ReLUs (--relu-spec-file).

The command lives in :mod:`secure_inference.cli.mmlab_train`,
also installed as ``si-train``; this path keeps
working with every flag (``--help`` lists them).
"""
import sys

from secure_inference.cli.mmlab_train import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
