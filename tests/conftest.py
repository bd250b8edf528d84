"""Shared pytest set-up: the package (and its compatibility fixes) is imported first."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import secure_inference  # noqa: E402,F401  (applies the compat fixes before torchvision/MMLab)
