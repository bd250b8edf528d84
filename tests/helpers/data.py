"""Reproducible random inputs for the tests."""
from __future__ import annotations

import torch


def random_images(n: int, hw: int, seed: int, channels: int = 3) -> torch.Tensor:
    """``n`` standard-normal images [n, channels, hw, hw] from a generator seeded with ``seed``."""
    return torch.randn(n, channels, hw, hw, generator=torch.Generator().manual_seed(seed))
