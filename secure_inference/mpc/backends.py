"""Exact convolution and matrix product modulo 2^64 on int64 tensors, on CPU or CUDA.

One interface (:class:`Backend`): ``conv2d(x, w, stride, padding, dilation, groups)`` and
``matmul(x, y)``, both exact modulo 2^64 (the ring of the shares).

* :class:`CpuInt64Backend`: torch's int64 ``conv2d``/``matmul`` on CPU wrap around modulo
  2^64 exactly (tested against Python integers on random 64-bit values).
* :class:`CpuHybridBackend` (the CPU default): the int64 kernels, with large ungrouped
  convolutions computed from float64 convolutions of balanced 22-bit limbs (faster on CPU,
  same exact result; 3 convolutions when one operand is small plaintext weights, else 6).
* :class:`LimbFloatBackend`: CUDA has no int64 convolution, so each operand is split into
  ``L`` unsigned limbs of ``b`` bits, ``x = Σ x_i 2^(b·i)``, and the product is
  ``Σ_{b(i+j) < 64} 2^(b(i+j)) · conv(x_i, w_j)`` mod 2^64. Each ``conv(x_i, w_j)`` runs in
  float64 (or float32) and is exact when every partial sum is an integer below 2^53 (2^24):
  with non-negative limbs every partial sum is at most ``K·(2^b − 1)^2`` for a reduction length
  ``K`` (input channels per group × kernel area, or the inner matrix dimension), so ``b`` is
  chosen from ``K`` and the bound is *checked* before computing (``ExactnessError`` otherwise).
  On CUDA, cuDNN is switched off for these calls (no FFT/Winograd algorithms, which are not
  exact) and TF32 is disabled, so convolutions run as im2col + GEMM in true float arithmetic.
  The limb arithmetic does not depend on the device, so it is also tested on CPU.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

IntPair = int | Sequence[int]
_MANTISSA = {torch.float64: 53, torch.float32: 24}


class ExactnessError(ValueError):
    """The requested limb width cannot keep floating-point partial sums exact."""


class Backend:
    """Exact int64 (mod 2^64) convolution and matrix product."""

    name = "abstract"

    def conv2d(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1, padding: IntPair = 0,
               dilation: IntPair = 1, groups: int = 1, *,
               small_weight: bool = False) -> torch.Tensor:
        """``small_weight``: the caller declares |w| < 2^21 (a backend may use fewer limbs;
        the choice must never depend on the values themselves)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _check_int64(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype != torch.int64:
            raise TypeError(f"ring tensors must be int64, got {t.dtype}")


class CpuInt64Backend(Backend):
    """torch int64 kernels (exact wrap-around on CPU; also shape-only 'meta' tensors)."""

    name = "cpu-int64"

    def conv2d(self, x, w, stride=1, padding=0, dilation=1, groups=1, *, small_weight=False):
        _check_int64(x, w)
        return F.conv2d(x, w, None, stride, padding, dilation, groups)

    def matmul(self, x, y):
        _check_int64(x, y)
        return torch.matmul(x, y)


def limb_bits_for(reduction: int, dtype: torch.dtype = torch.float64) -> int:
    """The widest limb width b with ``reduction · (2^b − 1)^2 < 2^mantissa`` (exact sums)."""
    mant = _MANTISSA[dtype]
    b = 32
    while b > 0 and reduction * (2 ** b - 1) ** 2 >= 2 ** mant:
        b -= 1
    if b == 0:
        raise ExactnessError(f"reduction length {reduction} is too long for exact {dtype} sums")
    return b


def check_exact(reduction: int, bits: int, dtype: torch.dtype) -> None:
    """Raise ExactnessError unless ``reduction`` products of ``bits``-bit limbs sum exactly."""
    mant = _MANTISSA[dtype]
    worst = reduction * (2 ** bits - 1) ** 2
    if worst >= 2 ** mant:
        raise ExactnessError(f"{reduction} products of {bits}-bit limbs can reach {worst} ≥ "
                             f"2^{mant}: {dtype} sums would round; use narrower limbs")


@contextlib.contextmanager
def _exact_float_mode(device: torch.device):
    """Disable cuDNN (FFT/Winograd) and TF32 for exact float convolutions on CUDA."""
    if device.type != "cuda":
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=False, deterministic=True, benchmark=False,
                                        allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _pairs_below_64(bits: int, count_x: int, count_w: int) -> list[tuple[int, int]]:
    """Limb pairs (i, j) whose product still matters modulo 2^64 (shift bits·(i+j) < 64)."""
    return [(i, j) for j in range(count_w) for i in range(count_x) if bits * (i + j) < 64]


def _limb_combine(xl: list[torch.Tensor], wl: list[torch.Tensor], pairs, bits: int,
                  products) -> torch.Tensor:
    """Σ over ``pairs`` of 2^(bits·(i+j)) · (x_i ⋆ w_j), mod 2^64, from float limb products:
    ``products(xs, w_j)`` returns the (exact, integer-valued) products of several x limbs with
    one w limb, batched where the operation allows."""
    out = None
    for j in sorted({j for _, j in pairs}):
        iis = [i for i, jj in pairs if jj == j]
        for i, prod in zip(iis, products([xl[i] for i in iis], wl[j])):
            term = prod.to(torch.int64)
            if i + j:
                term = torch.bitwise_left_shift(term, bits * (i + j))
            out = term if out is None else out.add_(term)
    return out


def _conv_products(n: int, geom: tuple):
    """Products of x limbs [n, C, H, W] with one weight limb: all limbs in one batched conv."""
    def products(xs, w):
        return F.conv2d(torch.cat(xs, 0), w, None, *geom).split(n)
    return products


class LimbFloatBackend(Backend):
    """Exact mod-2^64 products from float64/float32 products of b-bit limbs (for CUDA)."""

    name = "limb-float"

    def __init__(self, dtype: torch.dtype = torch.float64, limb_bits: int | None = None):
        if dtype not in _MANTISSA:
            raise ValueError(f"limb products run in float64 or float32, not {dtype}")
        self.dtype = dtype
        self.limb_bits = limb_bits

    def _bits(self, reduction: int) -> int:
        bits = self.limb_bits or limb_bits_for(reduction, self.dtype)
        check_exact(reduction, bits, self.dtype)
        return bits

    def _limbs(self, t: torch.Tensor, bits: int, count: int) -> list[torch.Tensor]:
        mask = (1 << bits) - 1
        return [torch.bitwise_and(torch.bitwise_right_shift(t, bits * i), mask).to(self.dtype)
                for i in range(count)]

    def conv2d(self, x, w, stride=1, padding=0, dilation=1, groups=1, *, small_weight=False):
        _check_int64(x, w)
        if x.is_meta or w.is_meta:
            return F.conv2d(x, w, None, stride, padding, dilation, groups)
        reduction = w.shape[1] * w.shape[2] * w.shape[3]
        bits = self._bits(reduction)
        count = math.ceil(64 / bits)
        xl, wl = self._limbs(x, bits, count), self._limbs(w, bits, count)
        with _exact_float_mode(x.device):
            return _limb_combine(xl, wl, _pairs_below_64(bits, count, count), bits,
                                 _conv_products(x.shape[0], (stride, padding, dilation, groups)))

    def matmul(self, x, y):
        _check_int64(x, y)
        if x.is_meta or y.is_meta:
            return torch.matmul(x, y)
        reduction = x.shape[-1]
        bits = self._bits(reduction)
        count = math.ceil(64 / bits)
        xl, yl = self._limbs(x, bits, count), self._limbs(y, bits, count)
        with _exact_float_mode(x.device):
            return _limb_combine(xl, yl, _pairs_below_64(bits, count, count), bits,
                                 lambda xs, yj: [torch.matmul(t, yj) for t in xs])


def balanced_limbs(t: torch.Tensor, bits: int, count: int) -> list[torch.Tensor]:
    """``t`` (int64, read modulo 2^64) as ``count`` signed digits, ``t = Σ d_i 2^(bits·i)``
    (mod 2^64): the first ``count − 1`` in [−2^(bits−1), 2^(bits−1)), the last whatever is
    left of the 64 bits (below 2^(63 − bits·(count−1)) in magnitude). Balanced digits have half
    the magnitude of unsigned ones, so float sums of their products stay exact for 4× longer
    reductions."""
    out, rest, half = [], t, 1 << (bits - 1)
    for _ in range(count - 1):
        d = torch.bitwise_and(rest + half, (1 << bits) - 1) - half
        out.append(d)
        rest = torch.bitwise_right_shift(rest - d, bits)   # exact: rest − d ≡ 0 (mod 2^bits)
    out.append(rest)
    return out


SMALL_WEIGHT_BITS = 21   # server weights below 2^21 (encoded) are one limb of the CPU backend


def fits_small(t: torch.Tensor) -> bool:
    """True if every element of int64 ``t`` lies strictly within ±2^21 (one balanced limb).
    Reads every element: its time depends only on the size of ``t``."""
    bound = 1 << SMALL_WEIGHT_BITS
    return bool(((t > -bound) & (t < bound)).all())


class CpuHybridBackend(CpuInt64Backend):
    """The CPU default: exact convolutions from float64 convolutions of balanced limbs.

    On one thread here torch's int64 conv2d reaches only ~0.3 GMAC/s while float64 runs up to
    ~18× faster. Both operands are split into three balanced limbs of 22 bits
    (:func:`balanced_limbs`; shifts 0, 22, 44) and only the 6 limb pairs whose shift is below
    64 are convolved: |digit| ≤ 2^21, so a reduction of K < 2^11 products stays below 2^53 and
    float64 is exact; longer reductions are split over input channels and summed in int64.
    When the caller declares the weights small — the server's plaintext fixed-point weights,
    |w| < 2^21, checked when they are opened — they are one limb and only 3 convolutions run (measured here: 3–10× faster than the int64
    kernel from 8×8 outputs up; 2.4× at 4×4). Grouped (depthwise) and small-output
    convolutions, and matmul, keep the int64 kernels.
    """

    name = "cpu-hybrid"

    def __init__(self) -> None:
        self._small_seen: dict[int, tuple[weakref.ref, int]] = {}
    LIMB_BITS = 22
    LIMBS = 3
    SMALL_BITS = SMALL_WEIGHT_BITS   # an operand declared below 2^21 is used as one limb
    MAX_REDUCTION = 1 << 11          # (2^21)^2 · 2^11 = 2^53
    MIN_OUTPUT_PIXELS = 64           # below these output sizes the int64 kernel wins (measured)
    MIN_OUTPUT_PIXELS_SMALL = 16

    def conv2d(self, x, w, stride=1, padding=0, dilation=1, groups=1, *,
               small_weight: bool = False):
        """``small_weight`` declares that every |w| < 2^21 (the server's plaintext weights,
        checked once when they are opened): 3 limb convolutions instead of 6. The path is
        chosen from this declaration and the public shapes only, never from the values:
        the server's timings reach the client, so a value-dependent path would reveal one
        bit per layer about the weights. A declaration that is false raises."""
        _check_int64(x, w)
        if x.is_meta or w.is_meta or groups != 1:
            return super().conv2d(x, w, stride, padding, dilation, groups)
        out_hw = F.conv2d(x.to("meta"), w.to("meta"), None, stride, padding, dilation).shape[-2:]
        min_pixels = self.MIN_OUTPUT_PIXELS_SMALL if small_weight else self.MIN_OUTPUT_PIXELS
        if (out_hw[0] * out_hw[1] < min_pixels
                or w.shape[2] * w.shape[3] >= self.MAX_REDUCTION):
            return super().conv2d(x, w, stride, padding, dilation, groups)
        if small_weight and not self._checked_small(w):
            raise ValueError(f"conv2d was told the weights are below 2^{self.SMALL_BITS} in "
                             "magnitude, and they are not")
        return self._limb_conv(x, w, (stride, padding, dilation), small_weight)

    def _checked_small(self, w: torch.Tensor) -> bool:
        """:func:`fits_small`, read once per weight tensor and version: the server passes the
        same opened tensor for every image, and its per-image convolutions should not rescan
        it."""
        key = id(w)
        seen = self._small_seen.get(key)
        if seen is not None and seen[0]() is w and seen[1] == w._version:
            return True
        if not fits_small(w):
            return False
        self._small_seen[key] = (weakref.ref(w), w._version)
        return True

    def _limb_conv(self, x: torch.Tensor, w: torch.Tensor, geom: tuple,
                   small: bool) -> torch.Tensor:
        bits, count = self.LIMB_BITS, self.LIMBS
        xl = [d.to(torch.float64) for d in balanced_limbs(x, bits, count)]
        wl = [w.to(torch.float64)] if small else \
            [d.to(torch.float64) for d in balanced_limbs(w, bits, count)]
        pairs = _pairs_below_64(bits, count, len(wl))
        step = self.MAX_REDUCTION // (w.shape[2] * w.shape[3]) - 1  # channels per exact chunk
        products = _conv_products(x.shape[0], geom)
        out = None
        for c0 in range(0, x.shape[1], step):    # int64 sum of exact partial convolutions
            part = _limb_combine([t[:, c0:c0 + step] for t in xl],
                                 [t[:, c0:c0 + step] for t in wl], pairs, bits, products)
            out = part if out is None else out.add_(part)
        return out


def get_backend(device: torch.device | str) -> Backend:
    """The default backend for a device: int64 kernels (limbs for large convs) on CPU, float64
    limbs on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return LimbFloatBackend(torch.float64)
    return CpuHybridBackend()
