"""Correlated randomness of the DReLU drawn from a pair key: exactly uniform small integers
(rejection sampling on 16-bit words, identical at both key holders), bits and ℓ-bit ring
elements."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..runtime import Party
from . import compare_kernels as K
from .zp import BLOCK, all_ones, require_little_endian

__all__ = ["pair_small", "small_host", "small_torch", "pair_bits", "pair_ring"]


Draw = Callable[[int], torch.Tensor]   # nbytes -> uint8 tensor: one occurrence of the stream


def pair_small(party: Party, other: int, count: int, high: int, tag: str) -> torch.Tensor:
    """Exactly uniform ints in [0, high) (high ≤ 256), identical at both key holders (int16).

    Each value is a 16-bit word of the pair stream reduced mod ``high``; words at or above the
    largest multiple of ``high`` below 2^16 (at most 0.4% of them, 0.015% for 67) are redrawn
    from the next occurrence of the same stream, position by position, identically at both
    holders (which make the same sequence of draws). Every accepted word is uniform below that
    multiple, so the result is exactly uniform.

    A CPU party reduces with the numba kernel (:func:`small_host`); a party on another device
    with torch operations there (:func:`small_torch`): the same draws and the same values.
    """
    def draw(nbytes: int) -> torch.Tensor:
        return party.pair_random(other, (nbytes,), tag=tag, dtype=torch.uint8)

    if party.device.type == "cpu":
        return small_host(draw, count, high)
    return small_torch(draw, count, high, party.device)


def small_host(draw: Draw, count: int, high: int) -> torch.Tensor:
    """:func:`pair_small`'s values from ``draw`` on the host (numpy and numba; int16 CPU)."""
    require_little_endian()
    limit = (65536 // high) * high
    out = np.empty(count, dtype=np.int16)
    for a in range(0, count, BLOCK):  # cache-sized draws (the same sequence at both holders)
        size = min(BLOCK, count - a)
        words = draw(2 * size).cpu().numpy().view(np.uint16)
        if not K.reduce_words(words, high, out[a:a + size]):
            continue
        bad = np.flatnonzero(words >= limit)   # rare: redraw these positions
        while bad.size:
            more = draw(2 * bad.size).cpu().numpy().view(np.uint16)
            out[a + bad] = more % np.uint16(high)
            bad = bad[more >= limit]
    return torch.from_numpy(out)


def _words16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 words of a uint8 tensor, as int32 in [0, 2^16)."""
    return raw.view(torch.int16).to(torch.int32) & 0xFFFF


def small_torch(draw: Draw, count: int, high: int, device: torch.device | str) -> torch.Tensor:
    """:func:`pair_small`'s values from ``draw`` with torch operations on ``device`` (int16):
    the same draws in the same order as :func:`small_host`, and the same values. One host
    sync per block (and per redraw) for the number of rejected words."""
    require_little_endian()
    if not 2 <= high <= 256:
        raise ValueError(f"high must be in [2, 256], got {high}")
    limit = (65536 // high) * high
    out = torch.empty(count, dtype=torch.int16, device=device)
    for a in range(0, count, BLOCK):
        size = min(BLOCK, count - a)
        words = _words16(draw(2 * size))
        out[a:a + size] = (words % high).to(torch.int16)
        bad = torch.nonzero(words >= limit).flatten()
        while bad.numel():
            more = _words16(draw(2 * bad.numel()))
            out[a + bad] = (more % high).to(torch.int16)
            bad = bad[more >= limit]
    return out


def pair_bits(party: Party, other: int, count: int, tag: str) -> torch.Tensor:
    """Uniform bits (int64 0/1) identical at both key holders."""
    return (party.pair_random(other, (count,), tag=tag, dtype=torch.uint8) & 1).to(torch.int64)


def pair_ring(party: Party, other: int, count: int, bits: int, tag: str) -> torch.Tensor:
    """Uniform ℓ-bit ring elements identical at both key holders."""
    v = party.pair_random(other, (count,), tag=tag)
    return v if bits == 64 else v & all_ones(bits)
