"""What every distortion engine shares: the error type, the replaceable activation kinds and
the progress callback type."""
from __future__ import annotations

from typing import Callable




Progress = Callable[[int], None]

#: activation kinds whose site can be replaced by a Block-ReLU (ReLU6 sites: a Block-ReLU6)
REPLACEABLE_KINDS = ("ReLU", "ReLU6", "BlockReLU", "BlockReLU6", "MultiSiteActivation")


class DistortionError(ValueError):
    """Bad input for distortion extraction; the message says what was wrong and what to do."""
