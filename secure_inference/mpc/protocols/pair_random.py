"""Correlated randomness of the DReLU drawn from a pair key: exactly uniform small integers
(rejection sampling on 16-bit words of one stream, identical at both key holders), bits and
ℓ-bit ring elements."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..runtime import Party
from . import compare_kernels as K
from .compare_kernels import MAX_HIGH
from .zp import BLOCK, all_ones, require_little_endian

__all__ = ["pair_small", "small_host", "small_torch", "pair_bits", "pair_ring"]


Read = Callable[[int], torch.Tensor]   # nbytes -> the next bytes of one stream (uint8 tensor)
_DEVICE_PIECE = 1 << 24                # values per keystream read off the CPU (32 MiB)


def pair_small(party: Party, other: int, count: int, high: int, tag: str) -> torch.Tensor:
    """Exactly uniform ints in [0, high) (high ≤ 2^15), identical at both key holders (int16).

    All values come from one pair stream (one occurrence of ``tag``), read in order: value i
    is the i-th 16-bit little-endian word reduced mod ``high``; words at or above the largest
    multiple of ``high`` below 2^16 (at most 0.4% of them for high ≤ 256, 0.015% for 67, 5.5%
    for the 4,422 of the PrivateCompare masks) are rejected, and the rejected positions, in
    ascending order, take the stream's next words, again and again until
    every position holds an accepted word. Every accepted word is uniform below that multiple,
    so the result is exactly uniform, and the rule does not depend on how the stream is read:
    a CPU party reads it in cache-sized blocks and reduces with numba (:func:`small_host`), a
    party on a GPU in large pieces with torch operations there (:func:`small_torch`), with one
    host sync per round of redraws rather than per block. Both give the same values.
    """
    stream = party.pair_stream(other, tag=tag)
    device = party.device

    def read(nbytes: int) -> torch.Tensor:
        return stream.bytes_tensor((nbytes,), device)

    if device.type == "cpu":
        return small_host(read, count, high)
    return small_torch(read, count, high, device)


def _check_high(high: int) -> int:
    if not 2 <= high <= MAX_HIGH:
        raise ValueError(f"high must be in [2, {MAX_HIGH}], got {high}")
    return (65536 // high) * high          # words below this are accepted


def small_host(read: Read, count: int, high: int) -> torch.Tensor:
    """:func:`pair_small`'s values from the stream ``read`` on the host (numba; int16 CPU)."""
    require_little_endian()
    _check_high(high)
    out = np.empty(count, dtype=np.int16)
    rejected = []
    found = np.empty(min(BLOCK, count), dtype=np.int64)   # one block's rejected positions
    for a in range(0, count, BLOCK):  # cache-sized reads of the stream, in order
        size = min(BLOCK, count - a)
        words = read(2 * size).cpu().numpy().view(np.uint16)
        nbad = K.sample_words(words, high, out[a:a + size], found)
        if nbad:
            rejected.append(a + found[:nbad])
    bad = np.concatenate(rejected) if rejected else np.empty(0, dtype=np.int64)
    while bad.size:                   # rare: the rejected positions take the next words
        more = read(2 * bad.size).cpu().numpy().view(np.uint16)
        bad = bad[:K.redraw_words(more, high, out, bad)]
    return torch.from_numpy(out)


def _words16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 words of a uint8 tensor, as int32 in [0, 2^16)."""
    return raw.view(torch.int16).to(torch.int32) & 0xFFFF


def small_torch(read: Read, count: int, high: int, device: torch.device | str) -> torch.Tensor:
    """:func:`pair_small`'s values from the stream ``read`` with torch operations on
    ``device`` (int16): the same values as :func:`small_host`. The stream is read in pieces of
    2^24 values with no host sync; one sync per round of redraws (about three in all)."""
    require_little_endian()
    limit = _check_high(high)
    out = torch.empty(count, dtype=torch.int16, device=device)
    rejected = torch.empty(count, dtype=torch.bool, device=device)
    for a in range(0, count, _DEVICE_PIECE):
        size = min(_DEVICE_PIECE, count - a)
        words = _words16(read(2 * size))
        out[a:a + size] = (words % high).to(torch.int16)
        rejected[a:a + size] = words >= limit
    bad = torch.nonzero(rejected).flatten()   # ascending positions
    while bad.numel():
        more = _words16(read(2 * bad.numel()))
        out[bad] = (more % high).to(torch.int16)
        bad = bad[more >= limit]
    return out


def pair_bits(party: Party, other: int, count: int, tag: str) -> torch.Tensor:
    """Uniform bits (int64 0/1) identical at both key holders."""
    return (party.pair_random(other, (count,), tag=tag, dtype=torch.uint8) & 1).to(torch.int64)


def pair_ring(party: Party, other: int, count: int, bits: int, tag: str) -> torch.Tensor:
    """Uniform ℓ-bit ring elements identical at both key holders."""
    v = party.pair_random(other, (count,), tag=tag)
    return v if bits == 64 else v & all_ones(bits)
