#!/usr/bin/env python
"""Calibrate a finetuned model's comparison widths (the step before secure inference).

The command lives in :mod:`secure_inference.cli.calibrate`, also installed as
``si-calibrate``; ``--help`` lists its flags.
"""
import sys

from secure_inference.cli.calibrate import main, build_parser  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
