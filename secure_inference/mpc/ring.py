"""The ring Z_2^64 in int64 tensors, fixed-point encoding and local truncation of shares.

Ring elements are ``torch.int64`` tensors (CPU or CUDA): int64 addition, subtraction and
multiplication wrap around modulo 2^64 in two's complement, which *is* the ring arithmetic, so
no explicit reduction is ever needed. A signed int64 read of a ring element is its centred
representative in [-2^63, 2^63).

Fixed point: a real ``x`` is encoded as ``round(x * 2^f)`` with ``f`` fractional bits.

Default ``f`` = :data:`DEFAULT_FRAC_BITS` = 16. Why 16:

* resolution 2^-16 ≈ 1.5e-5 keeps the encoding error of BN-folded convolution weights
  (typically 1e-3..1 in magnitude) and activations far below the noise a network tolerates
  (CrypTen uses the same 16 bits in a 64-bit ring);
* a product of two encoded values carries 2f = 32 fractional bits before truncation; for
  real magnitudes below 2^10 its ring value satisfies |x| < 2^42, so the local truncation
  failure probability is 2^(42+1-64) = 2^-21 per truncated element (see
  :func:`truncation_error_probability`); with f = 12 it would be 2^-29, at 16× coarser
  resolution. The final default is to be fixed from measured accuracy on the reference
  models; ``f`` is a parameter of every session (``Party.frac_bits``).

Local truncation (SecureML): with x = x0 + x1 mod 2^64, P0 computes ``x0 >> f`` (arithmetic)
and P1 computes ``-((-x1) >> f)``. If |x| < 2^l and x0 is uniform, the result equals
``floor(x / 2^f)`` up to ±1 in the last place (an off-by-one rounding error) except with
probability at most 2^(l+1-64), where the shares wrap and the result is off by about
±2^(64-f) (a catastrophic error). Keep values well inside the ring.
"""
from __future__ import annotations

import math

import torch

from .options import DEFAULT_FRAC_BITS   # defined once, with the other session defaults

RING_BITS = 64
RING_DTYPE = torch.int64
INPUT_HEADROOM_BITS = 47
"""Inputs must satisfy |x|·2^(2f) < 2^47 (|x| < 32768 at f = 16): the first layer's products
carry 2f fractional bits, and each local truncation of a value v fails with probability
|v|/2^64, so larger inputs make the secure output wrong without a word."""


class InputRangeError(ValueError):
    """Inputs a session cannot encode correctly (not finite, or too large for the fixed point)."""


def check_inputs(x: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS,
                 what: str = "the images") -> None:
    """Refuse inputs the fixed point cannot carry: integer tensors (raw pixels?), NaN or
    infinite values, and magnitudes at or above 2^(47 − 2f) (:data:`INPUT_HEADROOM_BITS`).
    Called before anything is sent, so a mistake costs no secure run."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputRangeError(f"{what} must be preprocessed floating-point values, got "
                              f"{getattr(x, 'dtype', type(x).__name__)} (raw uint8 pixels? "
                              "normalise them as the model's data preprocessor does)")
    if x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputRangeError(f"{what} contain {bad} NaN or infinite value(s); fix the "
                              "preprocessing before secure inference")
    top = float(x.abs().max())
    limit = 2.0 ** (INPUT_HEADROOM_BITS - 2 * int(frac_bits))
    if top >= limit:
        raise InputRangeError(
            f"{what} reach |x| = {top:.4g}, beyond what {frac_bits} fractional bits carry "
            f"(|x| < {limit:.4g}; products of the first layer would overflow the 64-bit ring "
            "and the secure output would be wrong): normalise the inputs as the model was "
            f"trained (e.g. (pixel - mean) / std), or use fewer fractional bits (--frac-bits; "
            "each bit less allows 4x larger inputs)")


def encode(x: torch.Tensor | float, frac_bits: int = DEFAULT_FRAC_BITS,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Encode reals as fixed point ``round(x * 2^f)`` in int64 (ring elements).

    Raises ValueError for non-finite values or magnitudes that do not fit in 63 bits.
    """
    t = torch.as_tensor(x, device=device)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("cannot encode non-finite values (NaN/inf) as fixed point")
    scaled = torch.round(t * float(2 ** frac_bits))
    if scaled.numel() and float(scaled.abs().max()) >= 2.0 ** 62:
        raise ValueError(f"value too large for fixed point with {frac_bits} fractional bits "
                         f"(|x| * 2^{frac_bits} must stay below 2^62)")
    return scaled.to(RING_DTYPE)


def decode(x: torch.Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> torch.Tensor:
    """Decode ring elements (centred representatives) to float64 reals ``x / 2^f``."""
    if x.dtype != RING_DTYPE:
        raise TypeError(f"decode expects int64 ring elements, got {x.dtype}")
    return x.to(torch.float64) / float(2 ** frac_bits)


def truncate_share(share: torch.Tensor, bits: int, role: int) -> torch.Tensor:
    """Local truncation of one party's share by ``bits`` (divide the shared value by 2^bits).

    P0 (role 0) shifts arithmetically; P1 (role 1) computes ``-((-x1) >> bits)``. Correct up
    to ±1 LSB except with probability 2^(l+1-64) for |x| < 2^l (module docstring).
    """
    if bits < 0 or bits >= RING_BITS:
        raise ValueError(f"truncation by {bits} bits is outside [0, 63]")
    if bits == 0:
        return share
    if role == 0:
        return torch.bitwise_right_shift(share, bits)
    if role == 1:
        return -torch.bitwise_right_shift(-share, bits)
    raise ValueError(f"only P0 and P1 hold shares to truncate, got role {role}")


def truncation_error_probability(magnitude_bits: int) -> float:
    """Upper bound 2^(l+1-64) on the chance that local truncation of a value with |x| < 2^l fails."""
    return min(1.0, 2.0 ** (magnitude_bits + 1 - RING_BITS))


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, ..."""
    return n > 0 and n & (n - 1) == 0


def reciprocal_fixed(d: int, precision_bits: int) -> tuple[int, int]:
    """Integer ``m`` and shift ``k`` with ``m / 2^k ≈ 1/d`` to ``precision_bits`` relative bits.

    Used to divide shares by a public integer: multiply locally by ``m`` and truncate by ``k``.
    ``k = precision_bits + ceil(log2 d)`` so that ``m`` has at least ``precision_bits`` bits and
    the relative error of the reciprocal is at most 2^-(precision_bits+1).
    """
    if d <= 0:
        raise ValueError(f"divisor must be a positive integer, got {d}")
    k = precision_bits + math.ceil(math.log2(d))
    return round(2 ** k / d), k
