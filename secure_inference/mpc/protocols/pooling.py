"""Average pooling on shares (local: no communication, no rounds).

Sum pooling is a depthwise convolution with a ones kernel on each share. Dividing by a public
integer ``d``: a power of two is a local truncation; otherwise each share is multiplied by
``m = round(2^k / d)`` with ``k = f + ceil(log2 d)`` and truncated by ``k``, so the reciprocal
has at least f significant bits (relative error ≤ 2^-(f+1)) and the intermediate has the same
magnitude as a fixed-point product (same truncation failure bound, see :mod:`..ring`), plus the
usual ±1 LSB of local truncation. Max pooling (comparisons) is in the non-linear protocols.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..ring import is_power_of_two, reciprocal_fixed
from ..runtime import Party
from .linear import Share, mul_public, truncate

__all__ = ["sum_pool2d", "div_public", "avg_pool2d", "global_avg_pool2d"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def sum_pool2d(party: Party, x: Share, kernel_size, stride=None, padding=0) -> Share:
    """Shares of the window sums of x [N, C, H, W] (zero padding), computed locally."""
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    channels = x.shape[1]
    ones = torch.ones((channels, 1, *k), dtype=torch.int64,
                      device="meta" if x.is_meta else x.device)
    return party.backend.conv2d(x, ones, s, _pair(padding), 1, channels)


def div_public(party: Party, x: Share, d: int | torch.Tensor) -> Share:
    """Shares of x / d for a public positive integer d (or an int64 tensor of divisors that
    broadcasts against x), by local truncation (power of two) or a fixed-point reciprocal."""
    if isinstance(d, torch.Tensor):
        if d.dtype not in (torch.int64, torch.int32) or bool((d <= 0).any()):
            raise ValueError("divisors must be positive integers")
        dmax = int(d.max())
        _, k = reciprocal_fixed(dmax, party.frac_bits)
        m = torch.round(2.0 ** k / d.to(torch.float64)).to(torch.int64)
        return truncate(party, mul_public(x, m), k)
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"divisor must be a positive integer, got {d!r}")
    if is_power_of_two(d):
        return truncate(party, x, d.bit_length() - 1)
    m, k = reciprocal_fixed(d, party.frac_bits)
    return truncate(party, mul_public(x, m), k)


def avg_pool2d(party: Party, x: Share, kernel_size, stride=None, padding=0, *,
               count_include_pad: bool = True, ceil_mode: bool = False,
               divisor_override: int | None = None) -> Share:
    """Shares of torch.nn.functional.avg_pool2d(x) (same arguments; ceil_mode unsupported)."""
    if ceil_mode:
        raise ValueError("avg_pool2d with ceil_mode=True is not supported on shares; pad the "
                         "input explicitly or use ceil_mode=False")
    k, pad = _pair(kernel_size), _pair(padding)
    sums = sum_pool2d(party, x, k, stride, pad)
    if divisor_override is not None:
        return div_public(party, sums, int(divisor_override))
    if count_include_pad or pad == (0, 0):
        return div_public(party, sums, k[0] * k[1])
    # divisors = number of real (non-padding) pixels in each window: public, from the shape
    ones = torch.ones((1, 1, x.shape[2], x.shape[3]), dtype=torch.float64)
    counts = F.avg_pool2d(ones, k, stride if stride is not None else k, pad,
                          count_include_pad=False, divisor_override=1)
    return div_public(party, sums, counts.round().to(torch.int64).to(party.device))


def global_avg_pool2d(party: Party, x: Share, keepdim: bool = False) -> Share:
    """Shares of the mean over H×W of x [N, C, H, W] ([N, C], or [N, C, 1, 1] with keepdim)."""
    sums = x.sum(dim=(2, 3), keepdim=keepdim)
    return div_public(party, sums, int(x.shape[2] * x.shape[3]))
