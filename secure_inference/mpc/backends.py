"""Exact convolution and matrix product modulo 2^64 on int64 tensors, on CPU or CUDA.

One interface (:class:`Backend`): ``conv2d(x, w, stride, padding, dilation, groups)`` and
``matmul(x, y)``, both exact modulo 2^64 (the ring of the shares).

* :class:`CpuInt64Backend`: torch's int64 ``conv2d``/``matmul`` on CPU wrap around modulo
  2^64 exactly (tested against Python integers on random 64-bit values).
* :class:`CpuHybridBackend` (the CPU default): the int64 kernels, with each ungrouped
  convolution routed by its public shape to the faster of two exact int64 paths: torch's
  int64 ``conv2d`` (output maps of 64 pixels and more), or im2col + one int64 matrix product
  against the weights transposed once per weight tensor (smaller output maps, where the
  convolution's inner loop runs over only a few pixels and is up to 3× slower).
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

All paths compute the same exact residues, so which one runs never changes a share.
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

    def prepare_conv(self, w: torch.Tensor, x_shape: Sequence[int], stride: IntPair = 1,
                     padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, *,
                     small_weight: bool = False) -> None:
        """Once per session and weight tensor (the set-up): whatever a later
        :meth:`conv2d` of ``w`` with inputs of ``x_shape`` would otherwise compute on its first
        call from ``w`` alone. Nothing by default."""


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


def _pair(v: IntPair) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = (int(t) for t in v)
    return a, b


def conv_output_hw(hw: Sequence[int], kernel: Sequence[int], stride: IntPair = 1,
                   padding: IntPair = 0, dilation: IntPair = 1) -> tuple[int, int]:
    """Output height and width of a convolution (torch's formula)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return ((int(hw[0]) + 2 * ph - dh * (int(kernel[0]) - 1) - 1) // sh + 1,
            (int(hw[1]) + 2 * pw - dw * (int(kernel[1]) - 1) - 1) // sw + 1)


def im2col(x: torch.Tensor, kernel: Sequence[int], stride: IntPair = 1, padding: IntPair = 0,
           dilation: IntPair = 1) -> tuple[torch.Tensor, int, int]:
    """The patches of ``x`` [N, C, H, W] (any dtype, int64 included, which torch's
    ``unfold`` refuses) as rows: ``[N·oh·ow, C·kh·kw]``, row ``(n, i, j)`` holding the zero-
    padded window of output pixel (i, j) in the order of ``w.reshape(C_out, C·kh·kw)``
    (channel, then kernel row, then kernel column); returns it with oh, ow."""
    kh, kw = int(kernel[0]), int(kernel[1])
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = x.shape
    oh, ow = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"a {kh}x{kw} kernel (dilation {dh}x{dw}, padding {ph}x{pw}) does not "
                         f"fit an input of {h}x{w}")
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    s0, s1, s2, s3 = xp.stride()
    windows = xp.as_strided((n, oh, ow, c, kh, kw),
                            (s0, s2 * sh, s3 * sw, s1, s2 * dh, s3 * dw))
    return windows.reshape(n * oh * ow, c * kh * kw), oh, ow


class CpuHybridBackend(CpuInt64Backend):
    """The CPU default: exact int64 convolutions, each on the faster of two int64 paths.

    Measured on one thread here (torch 2.13, ResNet18-CIFAR layer shapes, batch 1, 64-bit
    operands; benchmark/mpc/README_linear.md): torch's int64 ``conv2d`` runs 2–8 GMAC/s from
    8×8 output maps up, but only ~1–2 GMAC/s at 4×4 (its inner loop runs over the output
    pixels); im2col + one int64 matrix product ``patches @ Wᵀ`` (inner loop over the output
    channels) runs 5–7 GMAC/s there, 3× faster, and 10–25% slower on larger maps. So maps
    below :attr:`GEMM_BELOW_PIXELS` output pixels take the matrix product, the rest the
    convolution. ``Wᵀ`` is computed once per weight tensor (and version) and kept while the
    tensor lives: P0's F, P1's W and P2's B are the same tensors for every image.

    The float64 convolutions of balanced 22-bit limbs used before (6 limb products for two
    64-bit operands, 3 with the server's small weights) are 1.5–3.5× slower than these int64
    paths on this torch, and are no longer used on CPU (:func:`balanced_limbs` remains).

    The path follows from the public shapes only, never from the values (the server's timings
    reach the client). ``small_weight`` (the caller declares |w| < 2^21, the server's
    plaintext weights, checked when they are opened) is still checked once per weight tensor
    and a false declaration raises, but both paths are exact for any weights.
    """

    name = "cpu-hybrid"
    SMALL_BITS = SMALL_WEIGHT_BITS
    GEMM_BELOW_PIXELS = 64           # output maps below this many pixels: im2col + matmul

    def __init__(self) -> None:
        self._small_seen: dict[int, tuple[weakref.ref, int]] = {}
        self._transposed: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def conv_path(self, x_shape: Sequence[int], w_shape: Sequence[int], stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> str:
        """The kernel a convolution of these public shapes runs on: ``"conv"`` (torch's
        int64 conv2d) or ``"gemm"`` (im2col + int64 matmul)."""
        if groups != 1:
            return "conv"
        oh, ow = conv_output_hw(x_shape[2:], w_shape[2:], stride, padding, dilation)
        return "gemm" if oh * ow < self.GEMM_BELOW_PIXELS else "conv"

    def conv2d(self, x, w, stride=1, padding=0, dilation=1, groups=1, *,
               small_weight: bool = False):
        """``small_weight`` declares that every |w| < 2^21 (the server's plaintext weights,
        checked once when they are opened); a declaration that is false raises. The kernel
        is chosen by :meth:`conv_path` from the shapes only, never from the values."""
        _check_int64(x, w)
        if x.is_meta or w.is_meta:
            return super().conv2d(x, w, stride, padding, dilation, groups)
        if small_weight and not self._checked_small(w):
            raise ValueError(f"conv2d was told the weights are below 2^{self.SMALL_BITS} in "
                             "magnitude, and they are not")
        if self.conv_path(x.shape, w.shape, stride, padding, dilation, groups) == "conv":
            return super().conv2d(x, w, stride, padding, dilation, groups)
        return self._gemm_conv(x, w, stride, padding, dilation)

    def prepare_conv(self, w, x_shape, stride=1, padding=0, dilation=1, groups=1, *,
                     small_weight: bool = False) -> None:
        """The small-weight check and, on the matrix-product path, ``Wᵀ``, computed in the
        set-up instead of in the first image's convolution (both are kept per tensor)."""
        if small_weight and not self._checked_small(w):
            raise ValueError(f"conv2d was told the weights are below 2^{self.SMALL_BITS} in "
                             "magnitude, and they are not")
        if self.conv_path(x_shape, w.shape, stride, padding, dilation, groups) == "gemm":
            self._weights_t(w)

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

    def _weights_t(self, w: torch.Tensor) -> torch.Tensor:
        """``w.reshape(C_out, K).T`` contiguous, computed once per weight tensor and version
        (dropped when the tensor is freed)."""
        key = id(w)
        seen = self._transposed.get(key)
        if seen is not None and seen[0]() is w and seen[1] == w._version:
            return seen[2]
        wt = w.reshape(w.shape[0], -1).t().contiguous()
        table = self._transposed
        ref = weakref.ref(w, lambda _r, key=key: table.pop(key, None)
                          if table.get(key, (None,))[0] is _r else None)
        table[key] = (ref, w._version, wt)
        return wt

    def _gemm_conv(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair, padding: IntPair,
                   dilation: IntPair) -> torch.Tensor:
        """conv2d (groups 1) as im2col + one int64 matmul: exact mod 2^64 like the int64
        convolution (the same products and sums, wrapping the same way)."""
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"input has {x.shape[1]} channels, the weights expect {w.shape[1]}")
        n, cout = x.shape[0], w.shape[0]
        cols, oh, ow = im2col(x, w.shape[2:], stride, padding, dilation)
        out = torch.mm(cols, self._weights_t(w))                 # [N·oh·ow, C_out]
        return out.reshape(n, oh * ow, cout).transpose(1, 2).contiguous().reshape(
            n, cout, oh, ow)


def get_backend(device: torch.device | str) -> Backend:
    """The default backend for a device: int64 kernels on CPU (:class:`CpuHybridBackend`),
    float64 limbs on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return LimbFloatBackend(torch.float64)
    return CpuHybridBackend()
