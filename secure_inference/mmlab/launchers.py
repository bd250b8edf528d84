"""The launchers the MMLab training and test tools accept (``--launcher``): defined here, with
no mmengine or torch import, so that the command lines list them in ``--help`` at once."""
from __future__ import annotations

__all__ = ["LAUNCHERS"]

LAUNCHERS = ("none", "pytorch")   # one process, or one per GPU under torchrun
