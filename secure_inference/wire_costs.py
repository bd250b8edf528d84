"""Exact wire bytes of the secure non-linear layers, as plain integer formulas (no torch).

The secure runtime sends exactly these bytes (:mod:`secure_inference.mpc.protocols.drelu`
counts its messages with them and the tests compare them with measured traffic); the knapsack
prices block sizes with them. One batched DReLU of n comparisons over an ℓ-bit ring sends,
summed over all parties: the dealt bits of r' and the two PrivateCompare messages (3 · n(ℓ−1)
values mod 67, packed five per 4-byte word), the masked opening both ways (2n · ⌈ℓ/8⌉ bytes)
and the output shares (8n bytes). A fused multiplication (ReLU, Block-ReLU pixels, max) adds
24 bytes per payload value: two 64-bit masked shares to the helper and one 64-bit share back.
"""
from __future__ import annotations

__all__ = ["ZP_GROUP", "ZP_WORD_BYTES", "PAYLOAD_BYTES", "FULL_WIDTH", "zp_packed_bytes",
           "element_bytes", "drelu_bytes", "mul_drelu_bytes", "drelu_bytes_per_decision"]

ZP_GROUP = 5            # values mod 67 per wire word (67^5 < 2^31)
ZP_WORD_BYTES = 4
PAYLOAD_BYTES = 24      # per payload value of a fused multiplication (v0+m+ζ, v1−ζ, s·z share)
OUTPUT_SHARE_BYTES = 8  # the helper's share of each decision, over Z_2^64
FULL_WIDTH = 64         # the exact DReLU's ring


def _check_width(ring_bits: int) -> int:
    if isinstance(ring_bits, bool) or not isinstance(ring_bits, int) or not 3 <= ring_bits <= 64:
        raise ValueError(f"a comparison width must be an integer in [3, 64], got {ring_bits!r}")
    return ring_bits


def zp_packed_bytes(count: int) -> int:
    """Bytes of ``count`` values mod 67 on the wire (five per 4-byte word)."""
    return ZP_WORD_BYTES * -(-int(count) // ZP_GROUP)


def element_bytes(ring_bits: int) -> int:
    """Bytes of one ℓ-bit ring element on the wire."""
    return (_check_width(ring_bits) + 7) // 8


def drelu_bytes(n: int, ring_bits: int = FULL_WIDTH) -> int:
    """Payload bytes of one batched DReLU of ``n`` comparisons at width ``ring_bits``."""
    if n == 0:
        return 0
    low = _check_width(ring_bits) - 1
    return 3 * zp_packed_bytes(n * low) + 2 * n * element_bytes(ring_bits) + OUTPUT_SHARE_BYTES * n


def mul_drelu_bytes(n: int, m: int, ring_bits: int = FULL_WIDTH) -> int:
    """Payload bytes of a fused DReLU-multiplication: ``n`` decisions, ``m`` payload values."""
    if n == 0:
        return 0
    return drelu_bytes(n, ring_bits) + PAYLOAD_BYTES * int(m)


def drelu_bytes_per_decision(ring_bits: int = FULL_WIDTH) -> float:
    """Bytes per comparison for a large batch (the packing's rounding amortised away):
    12(ℓ−1)/5 + 2⌈ℓ/8⌉ + 8; 175.2 at ℓ = 64, 78.4 at ℓ = 27."""
    low = _check_width(ring_bits) - 1
    return 3 * ZP_WORD_BYTES * low / ZP_GROUP + 2 * element_bytes(ring_bits) + OUTPUT_SHARE_BYTES
