"""Candidate block sizes for one site: the options the distortion step measures.

The rule, for a site of H×W and the two limits ``max_rect`` (default 4) and ``max_size``
(default: the whole map):

1. ``[1, 1]`` (ordinary ReLU) first;
2. every rectangle h×w with 1 <= h, w <= max_rect (non-square included);
3. squares s×s for s on a roughly geometric ladder above max_rect
   (5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...: four steps per
   octave), up to ``max_size`` and at most the map's larger side;
4. identity ``[0, 1]`` last (no ReLU, no DReLU).

A size is first clipped to the map (h -> min(h, H), w -> min(w, W)): every h >= H cuts the
map into the same single row of patches, so such shapes are one option, and duplicates are
dropped keeping the first occurrence.
"""
from __future__ import annotations

import numpy as np

from .brelu import IDENTITY, block_costs


def square_ladder(lo: int, hi: int) -> list[int]:
    """Square sides > ``lo`` and <= ``hi``: lo+1 … 8, then four steps per octave."""
    sides, s = [], lo + 1
    while s <= hi:
        sides.append(s)
        step = max(1, 2 ** max(0, s.bit_length() - 3))  # 1 up to 7, 2 up to 15, 4 up to 31, ...
        s += step
    return sides


def candidate_block_sizes(height: int, width: int, max_rect: int = 4,
                          max_size: int | None = None, include_identity: bool = True) -> np.ndarray:
    """Candidate block sizes [K, 2] (int32) for an H×W site; see the module doc for the rule."""
    if height < 1 or width < 1:
        raise ValueError(f"map size must be positive, got {height}x{width}")
    if max_rect < 1:
        raise ValueError(f"max_rect must be >= 1, got {max_rect}")
    limit = max(height, width) if max_size is None else min(max_size, max(height, width))
    raw = [(1, 1)]
    raw += [(h, w) for h in range(1, max_rect + 1) for w in range(1, max_rect + 1)]
    raw += [(s, s) for s in square_ladder(max_rect, limit)]
    seen, out = set(), []
    for h, w in raw:
        key = (min(h, height), min(w, width))
        if key not in seen:
            seen.add(key)
            out.append(key)
    if include_identity:
        out.append(IDENTITY)
    return np.asarray(out, dtype=np.int32)


def candidate_costs(sizes: np.ndarray, height: int, width: int) -> np.ndarray:
    """DReLU cost per channel of each candidate (int64 [K])."""
    return block_costs(sizes, height, width)
