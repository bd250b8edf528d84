"""SecureNN's PrivateCompare (Wagh, Gupta, Chandran, PETS 2019) as the DReLU uses it: each of
P0 and P1 sends a message mod 67 built from its shares of the bits of a secret X and a public
R; the helper learns only β ⊕ [X > R] (β a P0–P1 coin). The construction and why the rotation
hides the zero's position are in :mod:`.drelu`'s docstring. Also the helper's dealt bit-share
corrections and the plain references the tests use.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..runtime import Party
from . import compare_kernels as K
from .pair_random import pair_small
from .zp import P, all_ones, checked_words, pack_zp, unpack_zp

__all__ = ["CompareRandomness", "compare_randomness", "bit_decompose", "plain_private_compare",
           "private_compare_message", "private_compare_packed", "private_compare_from_words",
           "private_compare_decide",
           "private_compare_decide_packed", "deal_corrections"]

_I64_MIN = -(1 << 63)
_PC_CHUNK = 8192            # rows of PrivateCompare arithmetic per block on a CPU (cache-sized)
_PC_CHUNK_DEVICE = 1 << 18  # ... on a GPU: few kernel launches (~10 int16 [rows, ℓ] temporaries)
_ZP_GROUP = 5


def _ult(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """Unsigned a < b for int64 bit patterns."""
    return (a ^ _I64_MIN) < (b ^ _I64_MIN if isinstance(b, int) else b ^ _I64_MIN)


def bit_decompose(v: torch.Tensor, bits: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The ``bits`` low bits of int64 ``v`` as a new last axis, most significant bit first.

    (MSB first makes PrivateCompare's sums over the higher bits plain prefix sums.)
    """
    if v.device.type == "cpu" and sys.byteorder == "little":
        raw = v.contiguous().numpy().astype(">i8").view(np.uint8).reshape(*v.shape, 8)
        out = np.unpackbits(raw, axis=-1, bitorder="big")[..., 64 - bits:]
        return torch.from_numpy(out).to(dtype)
    shifts = torch.arange(bits - 1, -1, -1, device=v.device, dtype=torch.int64)
    return ((v.unsqueeze(-1) >> shifts) & 1).to(dtype)


def plain_private_compare(x: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                          bits: int) -> torch.Tensor:
    """Reference: β ⊕ [x > r] for ℓ-bit unsigned x, r (bool tensor)."""
    mask = all_ones(bits)
    gt = _ult(r & mask, x & mask)
    return gt ^ beta.bool()


@dataclass
class CompareRandomness:
    """The P0–P1 common randomness of one batched PrivateCompare: per compared bit the
    multiplier s ∈ [1, 66] and the re-randomiser u ∈ [0, 66], drawn together as one value
    su = (s − 1)·67 + u uniform on [0, 66·67) (one 16-bit word of the stream for both:
    exactly uniform and independent, as two draws would be, at half the keystream), and a
    rotation per row."""

    su: torch.Tensor     # [n, ℓ] int16 uniform in 0..66·67−1
    shift: torch.Tensor  # [n] rotation offsets in 0..ℓ−1

    @property
    def s(self) -> torch.Tensor:
        """[n, ℓ] uniform in 1..66."""
        return torch.div(self.su, P, rounding_mode="floor") + 1

    @property
    def u(self) -> torch.Tensor:
        """[n, ℓ] uniform in 0..66."""
        return torch.remainder(self.su, P)


def compare_randomness(party: Party, other: int, n: int, bits: int,
                        tag: str) -> CompareRandomness:
    su = pair_small(party, other, n * bits, K.SU_HIGH, f"{tag}.su").view(n, bits)
    shift = pair_small(party, other, n, bits, f"{tag}.shift").to(torch.int64)
    return CompareRandomness(su, shift)


def _su_array(rnd: CompareRandomness | Any) -> np.ndarray:
    """The joint masks as the CPU kernels take them (from ``rnd.su``, or from separate ``s``
    and ``u`` as a plain reference object holds them)."""
    su = getattr(rnd, "su", None)
    if su is None:
        return K.join_su(rnd.s.cpu().numpy(), rnd.u.cpu().numpy())
    return su.to(torch.int16).contiguous().numpy()


def private_compare_message(role: int, xbits: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                            rnd: CompareRandomness | Any, bits: int) -> torch.Tensor:
    """Party ``role``'s PrivateCompare message (int16 [n, ℓ] in [0, 67)).

    ``xbits`` [n, ℓ]: this party's shares (mod 67) of the bits of the secret X, in the order of
    :func:`bit_decompose` (MSB first);
    ``r`` [n]: the public ℓ-bit value R; ``beta`` [n]: the common random bit. P2 decides
    β ⊕ [X > R] from both messages with :func:`private_compare_decide`.
    """
    n = r.numel()
    out = torch.empty((n, bits), dtype=torch.int16, device=r.device)
    beta = beta.reshape(n)
    chunk = _PC_CHUNK if r.device.type == "cpu" else _PC_CHUNK_DEVICE
    s_all, u_all = rnd.s, rnd.u   # (computed once: on CompareRandomness they are derived)
    for a in range(0, n, chunk):  # row blocks keep the working set in cache (or few launches)
        b = min(n, a + chunk)
        out[a:b] = _pc_rows(int(role), xbits[a:b], r[a:b], beta[a:b], s_all[a:b], u_all[a:b],
                            rnd.shift[a:b], bits)
    return out


def _pc_rows(j: int, xbits: torch.Tensor, r: torch.Tensor, beta: torch.Tensor, s: torch.Tensor,
             u: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`private_compare_message` on a block of rows."""
    n = r.numel()
    top = all_ones(bits)
    flip = beta.bool()
    q = torch.where(flip, (r + 1) & top, r)
    qb = bit_decompose(q, bits, torch.int16)          # MSB first: "higher bits" = prefix
    x = xbits.to(torch.int16)
    w = x * (1 - 2 * qb)                               # shares of x ⊕ q: x + j·q − 2qx
    if j:
        w += qb
    c = torch.cumsum(w, 1, dtype=torch.int16)          # |Σ| ≤ 64·67: int16 is exact
    c -= w                                             # Σ of w over the higher bits
    term = (qb - x) if j else -x                       # j·q − x
    c += torch.where(flip.view(n, 1), -term, term)     # σ(j·q − x), σ = 1 − 2β
    if j:
        c += 1
    special = flip & (r == top)        # β = 1, R = 2^ℓ − 1: X ≤ R always; exactly one zero
    row = torch.full((1, bits), j, dtype=torch.int16, device=c.device)
    row[0, 0] = 0
    c = torch.where(special.view(n, 1), row, c)   # no host sync for the (rare) rows
    c = torch.remainder(c, P)
    c *= s.to(torch.int16)                             # ≤ 66·66 + 66: still int16
    c += u.to(torch.int16) if j == 0 else P - u.to(torch.int16)
    d = torch.remainder(c, P)
    idx = torch.arange(bits, device=d.device) + shift.view(n, 1)   # cyclic rotation
    return torch.gather(torch.cat([d, d], 1), 1, idx)


def private_compare_packed(role: int, xbits: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                          rnd: CompareRandomness | Any, bits: int) -> torch.Tensor:
    """:func:`private_compare_message` packed for the wire (:func:`pack_zp`); one fused pass
    per row on CPU (:mod:`.compare_kernels`)."""
    if r.device.type != "cpu":
        return pack_zp(private_compare_message(role, xbits, r, beta, rnd, bits))
    n = r.numel()
    words = np.empty(-(-n * bits // _ZP_GROUP), dtype=np.int32)   # every word is written
    K.pc_message_packed(int(role), xbits.to(torch.int16).contiguous().numpy(),
                        r.reshape(n).contiguous().numpy(), beta.reshape(n).contiguous().numpy(),
                        _su_array(rnd), rnd.shift.to(torch.int64).contiguous().numpy(),
                        int(bits), words)
    return torch.from_numpy(words).view(torch.uint8)


def private_compare_from_words(role: int, xwords: np.ndarray, r: torch.Tensor,
                               beta: torch.Tensor, rnd: CompareRandomness | Any,
                               bits: int) -> torch.Tensor:
    """:func:`private_compare_packed` on a CPU with the bit shares of X still packed as the
    helper dealt them: ``xwords``, the int32 words of ``r.numel()·bits`` values mod 67, checked
    with :func:`.zp.checked_words` (no int16 array of the shares is made)."""
    n = r.numel()
    words = np.empty(-(-n * bits // _ZP_GROUP), dtype=np.int32)   # every word is written
    K.pc_message_from_words(int(role), xwords, r.reshape(n).contiguous().numpy(),
                            beta.reshape(n).contiguous().numpy(), _su_array(rnd),
                            rnd.shift.to(torch.int64).contiguous().numpy(), int(bits), words)
    return torch.from_numpy(words).view(torch.uint8)


def private_compare_decide_packed(data0: torch.Tensor, data1: torch.Tensor, n: int,
                                  bits: int) -> torch.Tensor:
    """P2's output from the two packed messages (bool [n]); refuses malformed messages."""
    if data0.device.type != "cpu":
        d0 = unpack_zp(data0, n * bits, source="P0").view(n, bits)
        d1 = unpack_zp(data1, n * bits, source="P1").view(n, bits)
        return private_compare_decide(d0, d1)
    w0 = checked_words(data0, n * bits, "P0")
    w1 = checked_words(data1, n * bits, "P1")
    out = np.zeros(n, dtype=np.bool_)
    K.decide_packed(w0, w1, n, bits, out)
    return torch.from_numpy(out)


def private_compare_decide(d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """P2's output of PrivateCompare: True where some d0_i + d1_i ≡ 0 (mod 67)."""
    s = d0 + d1                       # both in [0, 67): the sum is 0 mod 67 iff it is 0 or 67
    return ((s == 0) | (s == P)).any(dim=1)


def deal_corrections(r: torch.Tensor, shares0: torch.Tensor, bits: int) -> torch.Tensor:
    """P1's shares of the ``bits`` low bits of r over Z_67 (P0's are ``shares0``), packed."""
    n = r.numel()
    if shares0.numel() != n * bits:
        raise ValueError(f"expected {n * bits} shares of bits, got {shares0.numel()}")
    if r.device.type != "cpu":
        corr = bit_decompose(r, bits, torch.int16) - shares0.view(n, bits)
        return pack_zp(torch.remainder(corr, P))
    words = np.empty(-(-n * bits // _ZP_GROUP), dtype=np.int32)   # every word is written
    K.deal_corrections_packed(r.contiguous().numpy(), shares0.contiguous().numpy(), bits, words)
    return torch.from_numpy(words).view(torch.uint8)
