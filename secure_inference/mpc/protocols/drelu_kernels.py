"""CPU kernels (numba) of the DReLU's element-wise steps: masking the input for the opening,
combining the two opened shares, and the output shares of the bit or of the fused product.

On a CPU each of these replaced four to eight torch operations (one pass over n int64 values
each: about 30 ms per party per 10^6 DReLUs at ℓ = 27, a tenth of a party's CPU time) by one
pass. They compute exactly what the torch expressions in :mod:`.drelu` compute, which stay the
path of every other device and the reference the tests compare against (ring arithmetic wraps
modulo 2^64 in both: int64 overflow wraps in numba's LLVM code as in torch).

Nothing checks bounds inside the kernels; the wrappers check every array's size and dtype,
and a test compiles every kernel with numba's bounds checking on.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["mask_input", "combine_opened", "drelu_output", "mul_output", "warm_up", "OK",
           "TOO_WIDE"]

OK, TOO_WIDE = 0, 1

_NJ = dict(cache=True, error_model="numpy", nogil=True)


def _top(bits: int) -> int:
    return -1 if bits == 64 else (1 << bits) - 1


def _np(t: torch.Tensor, n: int, dtype, name: str) -> np.ndarray:
    if t.device.type != "cpu" or t.dtype != dtype or t.numel() != n:
        raise ValueError(f"{name}: expected {n} CPU values of {dtype}, got {t.numel()} "
                         f"({t.dtype}, {t.device})")
    return t.reshape(-1).contiguous().numpy()


@numba.njit(**_NJ)
def _mask_input(x, r, k, top, shift):
    for i in range(x.size):
        t = ((x[i] >> k) & top) if shift else x[i]
        r[i] = (t + r[i]) & top


def mask_input(x: torch.Tensor, r: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``r`` overwritten with (t + r) mod 2^ℓ, t = x (ℓ = 64, k = 0) or ⌊x / 2^k⌋ mod 2^ℓ
    (arithmetic shift then mask, as torch's ``(x >> k) & top``); returns ``r``."""
    if not (1 <= bits <= 64 and 0 <= k < 64):
        raise ValueError(f"bad width {bits} or shift {k}")
    n = r.numel()
    if not r.is_contiguous():
        raise ValueError("r must be contiguous")
    _mask_input(_np(x, n, torch.int64, "x"), _np(r, n, torch.int64, "r"), np.int64(k),
                np.int64(_top(bits)), not (bits == 64 and k == 0))
    return r


@numba.njit(**_NJ)
def _combine(mine, data, nb, bits, beta, xlow, g) -> int:
    n = mine.size
    top = np.int64(-1) if bits == 64 else (np.int64(1) << bits) - 1
    low = bits - 1
    lowmask = (np.int64(1) << low) - 1
    wide = np.int64(0)
    for i in range(n):
        o = np.uint64(i * nb)
        v = np.int64(0)
        for b in range(nb):
            v |= np.int64(data[o + np.uint64(b)]) << np.int64(8 * b)
        if bits < 64:
            wide |= v >> bits
        xh = (mine[i] + v) & top
        xlow[i] = xh & lowmask
        g[i] = 1 ^ ((xh >> low) & 1) ^ beta[i]
    return OK if wide == 0 else TOO_WIDE


def combine_opened(mine: torch.Tensor, data: torch.Tensor, bits: int, beta: torch.Tensor
                   ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """From this party's opened value ``mine`` and the other's ⌈ℓ/8⌉-byte little-endian
    elements ``data`` (uint8, length already checked by the caller): (status, the low ℓ − 1
    bits of x̂ = mine + other mod 2^ℓ, g = 1 ⊕ MSB(x̂) ⊕ β). status is :data:`TOO_WIDE` if a
    received element has bits at or above ℓ (the outputs are then meaningless and the caller
    must refuse the message)."""
    n = mine.numel()
    nb = (bits + 7) // 8
    raw = _np(data, n * nb, torch.uint8, "data")
    xlow = np.empty(n, dtype=np.int64)
    g = np.empty(n, dtype=np.int64)
    status = _combine(_np(mine, n, torch.int64, "mine"), raw, np.int64(nb), np.int64(bits),
                      _np(beta, n, torch.int64, "beta"), xlow, g)
    return int(status), torch.from_numpy(xlow), torch.from_numpy(g)


@numba.njit(**_NJ)
def _drelu_output(j, g, s, out):
    for i in range(s.size):
        out[i] = j * g[i] + (1 - 2 * g[i]) * s[i]


def drelu_output(j: int, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Party j's shares of DReLU = g ⊕ s from its shares ``s`` of the helper's bit: j·g +
    (1 − 2g)·s (a new tensor: ``s`` may be a received frame's read-only memory)."""
    n = s.numel()
    out = np.empty(n, dtype=np.int64)
    _drelu_output(np.int64(j), _np(g, n, torch.int64, "g"), _np(s, n, torch.int64, "s"), out)
    return torch.from_numpy(out)


@numba.njit(**_NJ)
def _mul_output(g, s, sz, mask, v, index, use_index, out):
    for i in range(out.size):
        d = index[i] if use_index else i
        vs = sz[i] - mask[i] * s[d]
        out[i] = v[i] - vs if g[d] != 0 else vs


def mul_output(g: torch.Tensor, s: torch.Tensor, sz: torch.Tensor, mask: torch.Tensor,
               v: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Shares of v·DReLU for each payload value: with sel = s[index] and gi = g[index] (the
    payload's own element when ``index`` is None), vs = sz − mask·sel and the result is
    v − vs where gi = 1, vs where gi = 0 (a new int64 tensor). ``index`` entries must lie in
    [0, len(s)) (the caller checked them)."""
    n, m = s.numel(), v.numel()
    if index is None:
        if n != m:
            raise ValueError("without an index, s and v must have the same length")
        idx = np.empty(0, dtype=np.int64)
    else:
        idx = _np(index, m, torch.int64, "index")
    out = np.empty(m, dtype=np.int64)
    _mul_output(_np(g, n, torch.int64, "g"), _np(s, n, torch.int64, "s"),
                _np(sz, m, torch.int64, "sz"), _np(mask, m, torch.int64, "mask"),
                _np(v, m, torch.int64, "v"), idx, index is not None, out)
    return torch.from_numpy(out)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel with the argument types the DReLU
    uses."""
    z = torch.zeros(2, dtype=torch.int64)
    mask_input(z, z.clone(), 27, 0)
    mask_input(z, z.clone(), 64, 0)
    combine_opened(z, torch.zeros(8, dtype=torch.uint8), 27, z)
    drelu_output(0, z, z)
    mul_output(z, z, z, z, z, None)
    mul_output(z, z, z, z, z, z)
