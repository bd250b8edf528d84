"""Correlated randomness of the DReLU drawn from a pair key: exactly uniform small integers
(rejection sampling on 16-bit words, identical at both key holders), bits and ℓ-bit ring
elements."""
from __future__ import annotations

import numpy as np
import torch

from ..runtime import Party
from . import compare_kernels as K
from .zp import BLOCK, all_ones, require_little_endian

__all__ = ["pair_small", "pair_bits", "pair_ring"]


def pair_small(party: Party, other: int, count: int, high: int, tag: str) -> torch.Tensor:
    """Exactly uniform ints in [0, high) (high ≤ 256), identical at both key holders (int16).

    Each value is a 16-bit word of the pair stream reduced mod ``high``; words at or above the
    largest multiple of ``high`` below 2^16 (at most 0.4% of them, 0.015% for 67) are redrawn
    from the next occurrence of the same stream, position by position, identically at both
    holders (which make the same sequence of draws). Every accepted word is uniform below that
    multiple, so the result is exactly uniform.
    """
    require_little_endian()
    limit = (65536 // high) * high
    out = np.empty(count, dtype=np.int16)
    for a in range(0, count, BLOCK):  # cache-sized draws (the same sequence at both holders)
        size = min(BLOCK, count - a)
        words = party.pair_random(other, (2 * size,), tag=tag, dtype=torch.uint8).cpu().numpy()
        words = words.view(np.uint16)
        if not K.reduce_words(words, high, out[a:a + size]):
            continue
        bad = np.flatnonzero(words >= limit)   # rare: redraw these positions
        while bad.size:
            more = party.pair_random(other, (2 * bad.size,), tag=tag, dtype=torch.uint8).cpu()
            more = more.numpy().view(np.uint16)
            out[a + bad] = more % np.uint16(high)
            bad = bad[more >= limit]
    return torch.from_numpy(out).to(party.device)


def pair_bits(party: Party, other: int, count: int, tag: str) -> torch.Tensor:
    """Uniform bits (int64 0/1) identical at both key holders."""
    return (party.pair_random(other, (count,), tag=tag, dtype=torch.uint8) & 1).to(torch.int64)


def pair_ring(party: Party, other: int, count: int, bits: int, tag: str) -> torch.Tensor:
    """Uniform ℓ-bit ring elements identical at both key holders."""
    v = party.pair_random(other, (count,), tag=tag)
    return v if bits == 64 else v & all_ones(bits)
