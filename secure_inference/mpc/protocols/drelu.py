"""DReLU from one masked opening and one PrivateCompare mod 67; approximate DReLU.

DReLU(x) = 1 if x ≥ 0 else 0, computed on additive shares of x over Z_2^64 (P0, P1) with the
helper P2, and returned as additive shares of the bit over Z_2^64. The comparison is
SecureNN's PrivateCompare (Wagh, Gupta, Chandran, PETS 2019); the rest uses the fact that the
helper deals the mask and may know it, which makes SecureNN's ShareConvert and its second
comparison unnecessary.

Notation: ℓ = ``config.ring_bits`` (64 for the exact DReLU), L = 2^ℓ, p = 67. For an ℓ-bit
value v, v' = v mod 2^(ℓ−1) are its low ℓ−1 bits and MSB(v) its top bit.

Protocol (n DReLUs at once; every step is vectorised over the n elements)

0. *Input.* t = x (exact) or t = ⌊x_j / 2^k⌋ mod L computed locally on each share
   (approximate, below). DReLU(x) = 1 − MSB(t) for t ∈ [−2^(ℓ−1), 2^(ℓ−1)).
1. *Masked opening* (round 1). P2 deals r = r0 + r1 mod L (r0, r1 drawn from the P0–P2 and
   P1–P2 PRGs: free) and the ℓ−1 low bits of r shared over Z_p (P0's shares from the PRG; P2
   sends P1 only the corrections). P0 and P1 exchange t_j + r_j and both learn
   x̂ = t + r mod L, uniform because r is. Over the integers (see the derivation below)
   MSB(t) = MSB(x̂) ⊕ MSB(r) ⊕ [r' > x̂'].
2. *PrivateCompare* (round 2). With a common random bit β of P0 and P1, each sends its
   PrivateCompare message for (bits of r', public x̂', β); P2 learns β' = β ⊕ [r' > x̂'].
3. *Output* (round 3). P2 knows s = MSB(r) ⊕ β' and shares it over Z_2^64 (one element to
   P1; P0's share from the PRG); P0 and P1 know g = 1 ⊕ MSB(x̂) ⊕ β and output
   DReLU = g ⊕ s, i.e. shares j·g + (1 − 2g)·s_j.

Derivation of step 1: write x̂ = 2^(ℓ−1)·a + x̂' and r = 2^(ℓ−1)·b + r'. Then
t ≡ x̂ − r = 2^(ℓ−1)·(a − b) + (x̂' − r') (mod L). If x̂' ≥ r' the low part lies in
[0, 2^(ℓ−1)) and MSB(t) = a ⊕ b; otherwise x̂' − r' + 2^(ℓ−1) does, with one borrow from the
top bit, and MSB(t) = a ⊕ b ⊕ 1.

PrivateCompare (SecureNN Algorithm 3, P2 learns β ⊕ [X > R] for bits of X shared over Z_p and
public R): with q = R (β = 0) or q = R + 1 (β = 1), w_i = X_i ⊕ q_i and
c_i = σ(q_i − X_i) + 1 + Σ_{k>i} w_k (σ = 1 − 2β); some c_i is 0 iff X > R (β = 0) or X ≤ R
(β = 1); for β = 1 and R = 2^b − 1 exactly one c_i is set to 0. Each party sends
d_i = s_i·c_i^j ± u_i mod p (s_i uniform nonzero and u_i uniform, both from the P0–P1 PRG; the
±u_i re-randomisation keeps P2 from relating the two parties' messages), rotated by a random
offset; P2 outputs whether some d_i^0 + d_i^1 = 0. At most one c_i is zero and the nonzero
s_i·c_i are independent and uniform on Z_p \\ {0}, so a uniformly random cyclic rotation hides
the zero's position exactly as a full permutation does.

What each party learns (semi-honest, no two parties colluding). Every message is masked by
randomness its receiver neither holds nor dealt (the view table of docs/secure_inference.md;
tests/mpc/test_views.py checks it by holding the receiver's keys fixed): P0 receives
t1 + r1 (r1: P1–P2 key), P1 receives t0 + r0 (r0: P0–P2 key), the bit-share corrections and
its output shares (masked by P0's shares from the P0–P2 key); P2 receives the two
PrivateCompare messages, masked by s and u from the P0–P1 key, which together reveal only
β ⊕ [r' > x̂'] (uniform: β is a P0–P1 coin), and in the fused multiplication
v0 + m + ζ and v1 − ζ (m, ζ: P0–P1 key), whose sum z = v + m is uniform to it.
P2 dealt the masks of the shares v0, v1 (the previous linear layer's A, B, c0, c1), so a raw
share sent to P2 would be a function of the secrets and P2's own keys: ζ is what prevents
that (this was a real leak, fixed; tests/mpc/test_helper_attack.py recovers the server's
weights by lattice reduction from the old message and finds nothing in the new one).

Encodings on the wire: values mod 67 are packed five per 4 bytes (67^5 < 2^31, 6.4 bits each),
elements of Z_L in ⌈ℓ/8⌉ bytes, the output shares as int64. Every received value is checked to
lie in its field (:class:`ProtocolError` otherwise).

Communication for n DReLUs (payload bytes summed over all parties, see :func:`drelu_bytes`),
B = ⌈ℓ/8⌉, Zp(m) = 4·⌈m/5⌉:

=====  ===========  ===============================================  =====================
round  direction    content                                          bytes
=====  ===========  ===============================================  =====================
1      P2→P1        bits of r' over Z_p                              Zp(n(ℓ−1))
1      P0↔P1        t_j + r_j                                        2nB
2      P0,P1→P2     PrivateCompare                                   2·Zp(n(ℓ−1))
3      P2→P1        s over Z_2^64                                    8n
=====  ===========  ===============================================  =====================

Exact 64-bit DReLU: 175.2 bytes per element for large n (180 for n = 1), 3 rounds; SecureNN
(ShareConvert, two PrivateCompares) needs 6 rounds, and its reference implementation's
measured cost is 496 bytes.

Fused multiplication (:func:`mul_drelu`): shares of v·DReLU(d) for payload values v that each
belong to one decision (ReLU: v = x; Block-ReLU: v = pixel, d = patch sum; max: v = d = a − b).
In round 1 P0 sends v0 + m + ζ and P1 sends v1 − ζ to P2 (m and ζ from the P0–P1 PRG), so
P2 learns only z = v + m; with the last message P2 also sends P1 a share of s·z. Then v·s = [s·z] − m·[s] and
v·DReLU = v·s (g = 0) or v − v·s (g = 1): 24 more bytes per payload value and no extra round.

Range. Exact (ℓ = 64, k = 0): correct for every x ∈ Z_2^64 read as a signed 64-bit integer.
Approximate DReLU (:meth:`DReLUConfig.approximate`): each party shifts its share right by k bits
(logically) and keeps ℓ bits, so the comparison runs over ℓ-bit rings (every message shrinks
with ℓ). The shares then sum to t = ⌊x/2^k⌋ − e mod 2^ℓ, e ∈ {0, 1} the carry of the two
shares' low k bits. For x in ``config.valid_range()`` = [−2^(k+ℓ−1) + 2^k, 2^(k+ℓ−1)) (k > 0)
the result is exact except for 0 ≤ x < 2^k, which is reported negative with probability
(2^k − 1 − x)/2^k (exactly when e = 1; :meth:`DReLUConfig.error_probability`). A ReLU or max
built on it is therefore off by less than 2^k (in fixed-point units) where it errs. Outside
the range the result is unspecified.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..runtime import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER, Party, ProtocolError
from . import compare_kernels as K

__all__ = ["P", "ROUNDS", "DReLUConfig", "EXACT", "drelu", "mul_drelu", "drelu_bytes",
           "mul_drelu_bytes", "zp_packed_bytes", "pack_zp", "unpack_zp", "pack_elements",
           "unpack_elements", "private_compare_message", "private_compare_decide",
           "private_compare_packed", "private_compare_decide_packed",
           "plain_private_compare", "plain_drelu", "set_default_config", "resolve_config",
           "bit_decompose"]

P = 67                      # PrivateCompare field (a prime above ℓ + 2 for every ℓ ≤ 64)
ROUNDS = 3                  # rounds of one (batched) DReLU or fused DReLU-multiplication
_ZP_GROUP = 5               # values mod 67 per packed word: 67^5 = 1,350,125,107 < 2^31
_ZP_WORD_BYTES = 4
_ZP_WORD_LIMIT = P ** _ZP_GROUP
_I64_MIN = -(1 << 63)
_CACHE_KEY = "drelu_config"
_PC_CHUNK = 8192            # rows of PrivateCompare arithmetic per block (cache-sized)
_BLOCK = 1 << 18            # elements per block in packing and sampling loops


def _i64(v: int) -> int:
    """The int64 (two's complement) representative of an integer modulo 2^64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _all_ones(bits: int) -> int:
    """2^bits − 1 as an int64 constant (−1 for 64 bits)."""
    return _i64((1 << bits) - 1)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DReLUConfig:
    """Which DReLU to run: exact (``ring_bits=64, drop_bits=0``) or approximate.

    ``ring_bits`` (ℓ) is the width of the ring the comparison runs in and ``drop_bits`` (k) the
    number of low bits each party drops locally before it. Valid inputs are
    :meth:`valid_range`; see the module docstring for the error analysis.
    """

    ring_bits: int = 64
    drop_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.ring_bits, int) or not isinstance(self.drop_bits, int):
            raise TypeError("ring_bits and drop_bits must be ints")
        if not 3 <= self.ring_bits <= 64:
            raise ValueError(f"ring_bits must be in [3, 64], got {self.ring_bits}")
        if self.drop_bits < 0 or self.ring_bits + self.drop_bits > 64:
            raise ValueError(f"need 0 <= drop_bits and ring_bits + drop_bits <= 64, got "
                             f"ring_bits={self.ring_bits}, drop_bits={self.drop_bits}")

    @classmethod
    def approximate(cls, max_abs_bits: int, drop_bits: int = 0) -> "DReLUConfig":
        """An approximate DReLU for inputs with |x| < 2^max_abs_bits that ignores ``drop_bits``
        low bits (ring of ℓ = max_abs_bits − drop_bits + 1 bits)."""
        if max_abs_bits <= drop_bits + 1:
            raise ValueError(f"max_abs_bits ({max_abs_bits}) must exceed drop_bits + 1 "
                             f"({drop_bits + 1})")
        return cls(ring_bits=max_abs_bits - drop_bits + 1, drop_bits=drop_bits)

    @property
    def exact(self) -> bool:
        """True for the exact 64-bit DReLU."""
        return self.ring_bits == 64 and self.drop_bits == 0

    def valid_range(self) -> tuple[int, int]:
        """``(lo, hi)``: inputs lo ≤ x < hi (fixed-point integers) are handled as documented."""
        top = 1 << (self.drop_bits + self.ring_bits - 1)
        lo = -top + (1 << self.drop_bits) if self.drop_bits else -top
        return lo, top

    def error_probability(self, x: torch.Tensor) -> torch.Tensor:
        """Probability (over the sharing) that DReLU(x) is reported wrongly, for x in range."""
        x = torch.as_tensor(x, dtype=torch.int64)
        if self.drop_bits == 0:
            return torch.zeros(x.shape, dtype=torch.float64)
        span = 1 << self.drop_bits
        inside = (x >= 0) & (x < span)
        return torch.where(inside, (span - 1 - x).to(torch.float64) / span,
                           torch.zeros((), dtype=torch.float64))

    def __str__(self) -> str:
        if self.exact:
            return "exact"
        return f"approx(ring_bits={self.ring_bits}, drop_bits={self.drop_bits})"


EXACT = DReLUConfig()


def set_default_config(party: Party, config: DReLUConfig | None) -> None:
    """Make ``config`` this session's DReLU for every call that passes ``config=None``.

    All three parties must set the same configuration (it changes message sizes).
    """
    if config is None:
        party.cache.pop(_CACHE_KEY, None)
    elif not isinstance(config, DReLUConfig):
        raise TypeError(f"expected a DReLUConfig, got {type(config).__name__}")
    else:
        party.cache[_CACHE_KEY] = config


def resolve_config(party: Party, config: DReLUConfig | None) -> DReLUConfig:
    """``config`` if given, else the session default (:func:`set_default_config`), else exact."""
    if config is not None:
        if not isinstance(config, DReLUConfig):
            raise TypeError(f"expected a DReLUConfig, got {type(config).__name__}")
        return config
    return party.cache.get(_CACHE_KEY, EXACT)


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------

def zp_packed_bytes(count: int) -> int:
    """Bytes of ``count`` values mod 67 on the wire (five per 4-byte word)."""
    return _ZP_WORD_BYTES * -(-count // _ZP_GROUP)


def drelu_bytes(n: int, config: DReLUConfig = EXACT) -> int:
    """Payload bytes of one batched DReLU of ``n`` elements, summed over all parties."""
    if n == 0:
        return 0
    ell, nb = config.ring_bits, (config.ring_bits + 7) // 8
    return (3 * zp_packed_bytes(n * (ell - 1))     # dealt bits of r', two compare messages
            + 2 * n * nb                           # the masked opening t_j + r_j, both ways
            + 8 * n)                               # output share s


def mul_drelu_bytes(n: int, m: int, config: DReLUConfig = EXACT) -> int:
    """Payload bytes of :func:`mul_drelu` with ``n`` decisions and ``m`` payload values."""
    if n == 0:
        return 0
    return drelu_bytes(n, config) + 24 * m


# --------------------------------------------------------------------------------------------
# Arithmetic helpers (pure functions, also used by the tests as references)
# --------------------------------------------------------------------------------------------

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
    mask = _all_ones(bits)
    gt = _ult(r & mask, x & mask)
    return gt ^ beta.bool()


def plain_drelu(x: torch.Tensor) -> torch.Tensor:
    """Reference DReLU on plaintext int64 values: 1 where x ≥ 0 (int64)."""
    return (x >= 0).to(torch.int64)


# --------------------------------------------------------------------------------------------
# Wire encodings
# --------------------------------------------------------------------------------------------

def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("the DReLU wire encodings assume a little-endian machine")


def pack_zp(v: torch.Tensor) -> torch.Tensor:
    """Pack values in [0, 67) (any shape, flattened) five per 4 bytes; returns uint8."""
    _require_little_endian()
    if v.device.type != "cpu":
        return _pack_zp_torch(v)
    flat = v.reshape(-1).contiguous().numpy()
    words = np.zeros(-(-flat.size // _ZP_GROUP), dtype=np.int32)
    K.pack_values(flat, words)
    return torch.from_numpy(words).view(torch.uint8)


def _pack_zp_torch(v: torch.Tensor) -> torch.Tensor:
    """:func:`pack_zp` in torch operations (any device; the reference for the CPU kernel)."""
    flat = v.reshape(-1)
    words = -(-flat.numel() // _ZP_GROUP)
    pad = words * _ZP_GROUP - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(words, _ZP_GROUP)
    packed = torch.empty(words, dtype=torch.int32, device=flat.device)
    for a in range(0, words, _BLOCK):
        blk = g[a:a + _BLOCK].to(torch.int32)
        acc = blk[:, 4].clone()
        for i in (3, 2, 1, 0):  # Horner: Σ v_i 67^i < 67^5 < 2^31
            acc.mul_(P).add_(blk[:, i])
        packed[a:a + _BLOCK] = acc
    return packed.view(torch.uint8)


def _zp_words(data: torch.Tensor, count: int, source: str) -> torch.Tensor:
    """The int32 words of a packed message of ``count`` values, after the length check."""
    _require_little_endian()
    words = -(-count // _ZP_GROUP)
    if data.dtype != torch.uint8 or data.numel() != words * _ZP_WORD_BYTES:
        raise ProtocolError(f"{source}: expected {words * _ZP_WORD_BYTES} bytes of packed Z_67 "
                            f"values, got {data.numel()} ({data.dtype})")
    if data.storage_offset() % _ZP_WORD_BYTES or not data.is_contiguous():
        data = data.clone()
    return data.view(torch.int32)


def _checked_cpu_words(data: torch.Tensor, count: int, source: str) -> np.ndarray:
    words = _zp_words(data, count, source).numpy()
    err = K.check_words(words, count)
    if err == K.WORD_OUT_OF_RANGE:
        raise ProtocolError(f"{source}: packed Z_67 word out of range (malformed message)")
    if err == K.NONZERO_PADDING:
        raise ProtocolError(f"{source}: nonzero padding in packed Z_67 values")
    return words


def unpack_zp(data: torch.Tensor, count: int, *, source: str = "peer") -> torch.Tensor:
    """Inverse of :func:`pack_zp` for ``count`` values (int16); refuses anything malformed."""
    if data.device.type != "cpu":
        return _unpack_zp_torch(data, count, source=source)
    words = _checked_cpu_words(data, count, source)
    out = np.empty(count, dtype=np.int16)
    K.unpack_words(words, out)
    return torch.from_numpy(out)


def _unpack_zp_torch(data: torch.Tensor, count: int, *, source: str = "peer") -> torch.Tensor:
    """:func:`unpack_zp` in torch/numpy operations (the reference for the CPU kernel)."""
    words = -(-count // _ZP_GROUP)
    w_all = _zp_words(data, count, source)
    if bool(((w_all < 0) | (w_all >= _ZP_WORD_LIMIT)).any()):
        raise ProtocolError(f"{source}: packed Z_67 word out of range (malformed message)")
    if w_all.device.type == "cpu":  # numpy divides by a constant much faster than torch
        w_np = w_all.numpy()
        digits_np = np.empty((words, _ZP_GROUP), dtype=np.int16)
        for a in range(0, words, _BLOCK):
            w = w_np[a:a + _BLOCK]
            for i in range(_ZP_GROUP):
                q = w // P
                digits_np[a:a + _BLOCK, i] = w - q * P
                w = q
        digits = torch.from_numpy(digits_np)
    else:
        digits = torch.empty((words, _ZP_GROUP), dtype=torch.int16, device=data.device)
        for a in range(0, words, _BLOCK):
            w = w_all[a:a + _BLOCK]
            for i in range(_ZP_GROUP):
                q = torch.div(w, P, rounding_mode="floor")
                digits[a:a + _BLOCK, i] = w - q * P
                w = q
    flat = digits.view(-1)
    if bool((flat[count:] != 0).any()):
        raise ProtocolError(f"{source}: nonzero padding in packed Z_67 values")
    return flat[:count]


def pack_elements(v: torch.Tensor, bits: int) -> torch.Tensor:
    """ℓ-bit ring elements (int64, flattened) as ⌈ℓ/8⌉ little-endian bytes each (uint8)."""
    _require_little_endian()
    nb = (bits + 7) // 8
    raw = v.reshape(-1).contiguous().view(torch.uint8)
    if nb == 8:
        return raw
    return raw.view(-1, 8)[:, :nb].reshape(-1)


def pack_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` ℓ-bit ring elements on the wire."""
    return count * ((bits + 7) // 8)


def unpack_elements(data: torch.Tensor, count: int, bits: int, *,
                    source: str = "peer") -> torch.Tensor:
    """Inverse of :func:`pack_elements`; checks each value is below 2^ℓ."""
    _require_little_endian()
    nb = (bits + 7) // 8
    if data.dtype != torch.uint8 or data.numel() != count * nb:
        raise ProtocolError(f"{source}: expected {count * nb} bytes of {bits}-bit elements, got "
                            f"{data.numel()} ({data.dtype})")
    if nb == 8:
        v = data.clone().view(torch.int64)
    else:
        full = torch.zeros((count, 8), dtype=torch.uint8, device=data.device)
        full[:, :nb] = data.view(count, nb)
        v = full.view(torch.int64).view(count)
    if bits < 64 and bool(((v >> bits) != 0).any()):
        raise ProtocolError(f"{source}: element wider than {bits} bits (malformed message)")
    return v


# --------------------------------------------------------------------------------------------
# Randomness helpers
# --------------------------------------------------------------------------------------------

def _pair_small(party: Party, other: int, count: int, high: int, tag: str) -> torch.Tensor:
    """Exactly uniform ints in [0, high) (high ≤ 256), identical at both key holders (int16).

    Each value is a 16-bit word of the pair stream reduced mod ``high``; words at or above the
    largest multiple of ``high`` below 2^16 (at most 0.4% of them, 0.015% for 67) are redrawn
    from the next occurrence of the same stream, position by position, identically at both
    holders (which make the same sequence of draws). Every accepted word is uniform below that
    multiple, so the result is exactly uniform.
    """
    _require_little_endian()
    limit = (65536 // high) * high
    out = np.empty(count, dtype=np.int16)
    for a in range(0, count, _BLOCK):  # cache-sized draws (the same sequence at both holders)
        size = min(_BLOCK, count - a)
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


def _pair_bits(party: Party, other: int, count: int, tag: str) -> torch.Tensor:
    """Uniform bits (int64 0/1) identical at both key holders."""
    return (party.pair_random(other, (count,), tag=tag, dtype=torch.uint8) & 1).to(torch.int64)


def _pair_ring(party: Party, other: int, count: int, bits: int, tag: str) -> torch.Tensor:
    """Uniform ℓ-bit ring elements identical at both key holders."""
    v = party.pair_random(other, (count,), tag=tag)
    return v if bits == 64 else v & _all_ones(bits)


# --------------------------------------------------------------------------------------------
# PrivateCompare
# --------------------------------------------------------------------------------------------

@dataclass
class _CompareRandomness:
    """The P0–P1 common randomness of one batched PrivateCompare."""

    s: torch.Tensor      # [n, ℓ] uniform in 1..66
    u: torch.Tensor      # [n, ℓ] uniform in 0..66
    shift: torch.Tensor  # [n] rotation offsets in 0..ℓ−1


def _compare_randomness(party: Party, other: int, n: int, bits: int,
                        tag: str) -> _CompareRandomness:
    s = _pair_small(party, other, n * bits, P - 1, f"{tag}.s").view(n, bits) + 1
    u = _pair_small(party, other, n * bits, P, f"{tag}.u").view(n, bits)
    shift = _pair_small(party, other, n, bits, f"{tag}.shift").to(torch.int64)
    return _CompareRandomness(s, u, shift)


def private_compare_message(role: int, xbits: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                            rnd: _CompareRandomness | Any, bits: int) -> torch.Tensor:
    """Party ``role``'s PrivateCompare message (int16 [n, ℓ] in [0, 67)).

    ``xbits`` [n, ℓ]: this party's shares (mod 67) of the bits of the secret X, in the order of
    :func:`bit_decompose` (MSB first);
    ``r`` [n]: the public ℓ-bit value R; ``beta`` [n]: the common random bit. P2 decides
    β ⊕ [X > R] from both messages with :func:`private_compare_decide`.
    """
    n = r.numel()
    out = torch.empty((n, bits), dtype=torch.int16, device=r.device)
    beta = beta.reshape(n)
    for a in range(0, n, _PC_CHUNK):  # row blocks keep the working set in cache
        b = min(n, a + _PC_CHUNK)
        out[a:b] = _pc_rows(int(role), xbits[a:b], r[a:b], beta[a:b], rnd.s[a:b], rnd.u[a:b],
                            rnd.shift[a:b], bits)
    return out


def _pc_rows(j: int, xbits: torch.Tensor, r: torch.Tensor, beta: torch.Tensor, s: torch.Tensor,
             u: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`private_compare_message` on a block of rows."""
    n = r.numel()
    top = _all_ones(bits)
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
    special = flip & (r == top)
    if bool(special.any()):  # β = 1, R = 2^ℓ − 1: X ≤ R always; exactly one zero
        row = torch.full((bits,), j, dtype=torch.int16, device=c.device)
        row[0] = 0
        c[special] = row
    c = torch.remainder(c, P)
    c *= s.to(torch.int16)                             # ≤ 66·66 + 66: still int16
    c += u.to(torch.int16) if j == 0 else P - u.to(torch.int16)
    d = torch.remainder(c, P)
    idx = torch.arange(bits, device=d.device) + shift.view(n, 1)   # cyclic rotation
    return torch.gather(torch.cat([d, d], 1), 1, idx)


def private_compare_packed(role: int, xbits: torch.Tensor, r: torch.Tensor, beta: torch.Tensor,
                          rnd: _CompareRandomness | Any, bits: int) -> torch.Tensor:
    """:func:`private_compare_message` packed for the wire (:func:`pack_zp`); one fused pass
    per row on CPU (:mod:`.compare_kernels`)."""
    if r.device.type != "cpu":
        return pack_zp(private_compare_message(role, xbits, r, beta, rnd, bits))
    n = r.numel()
    words = np.zeros(-(-n * bits // _ZP_GROUP), dtype=np.int32)
    K.pc_message_packed(int(role), xbits.to(torch.int16).contiguous().numpy(),
                        r.reshape(n).contiguous().numpy(), beta.reshape(n).contiguous().numpy(),
                        rnd.s.to(torch.int16).contiguous().numpy(),
                        rnd.u.to(torch.int16).contiguous().numpy(),
                        rnd.shift.to(torch.int64).contiguous().numpy(), int(bits), words)
    return torch.from_numpy(words).view(torch.uint8)


def private_compare_decide_packed(data0: torch.Tensor, data1: torch.Tensor, n: int,
                                  bits: int) -> torch.Tensor:
    """P2's output from the two packed messages (bool [n]); refuses malformed messages."""
    if data0.device.type != "cpu":
        d0 = unpack_zp(data0, n * bits, source="P0").view(n, bits)
        d1 = unpack_zp(data1, n * bits, source="P1").view(n, bits)
        return private_compare_decide(d0, d1)
    w0 = _checked_cpu_words(data0, n * bits, "P0")
    w1 = _checked_cpu_words(data1, n * bits, "P1")
    out = np.zeros(n, dtype=np.bool_)
    K.decide_packed(w0, w1, n, bits, out)
    return torch.from_numpy(out)


def private_compare_decide(d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """P2's output of PrivateCompare: True where some d0_i + d1_i ≡ 0 (mod 67)."""
    s = d0 + d1                       # both in [0, 67): the sum is 0 mod 67 iff it is 0 or 67
    return ((s == 0) | (s == P)).any(dim=1)


# --------------------------------------------------------------------------------------------
# DReLU protocol
# --------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return int(math.prod(shape))


def _deal_corrections(r: torch.Tensor, shares0: torch.Tensor, bits: int) -> torch.Tensor:
    """P1's shares of the ``bits`` low bits of r over Z_67 (P0's are ``shares0``), packed."""
    n = r.numel()
    if r.device.type != "cpu":
        corr = bit_decompose(r, bits, torch.int16) - shares0.view(n, bits)
        return pack_zp(torch.remainder(corr, P))
    words = np.zeros(-(-n * bits // _ZP_GROUP), dtype=np.int32)
    K.deal_corrections_packed(r.contiguous().numpy(), shares0.contiguous().numpy(), bits, words)
    return torch.from_numpy(words).view(torch.uint8)


def _helper_core(party: Party, n: int, m: int, bits: int,
                 index: torch.Tensor | None) -> None:
    """P2's side of :func:`_drelu_core`."""
    low = bits - 1
    # deal: r = r0 + r1 (both free); P1's shares of the bits of r' are corrections
    r = (_pair_ring(party, ROLE_CLIENT, n, bits, "dr.r")
         + _pair_ring(party, ROLE_SERVER, n, bits, "dr.r")) & _all_ones(bits)
    rbits0 = _pair_small(party, ROLE_CLIENT, n * low, P, "dr.rbits")
    party.send(ROLE_SERVER, _deal_corrections(r, rbits0, low))
    msb_r = (r >> low) & 1
    del rbits0, r
    s0 = party.pair_random(ROLE_CLIENT, (n,), tag="out.s")    # drawn while P0, P1 work
    sz0 = party.pair_random(ROLE_CLIENT, (m,), tag="out.sz") if m else None
    if m:
        z = party.recv(ROLE_CLIENT, (m,)) + party.recv(ROLE_SERVER, (m,))
    cmp_bytes = zp_packed_bytes(n * low)
    beta_p = private_compare_decide_packed(party.recv(ROLE_CLIENT, (cmp_bytes,), torch.uint8),
                                           party.recv(ROLE_SERVER, (cmp_bytes,), torch.uint8),
                                           n, low).to(torch.int64).to(party.device)
    s = msb_r ^ beta_p
    out = [s - s0]
    if m:
        sz = (s if index is None else s[index]) * z
        out.append(sz - sz0)
    party.send(ROLE_SERVER, torch.cat(out) if len(out) > 1 else out[0])


def _drelu_core(party: Party, x: torch.Tensor, config: DReLUConfig,
                payload: torch.Tensor | None, index: torch.Tensor | None,
                want_bits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Shared body of :func:`drelu` and :func:`mul_drelu` (flattened tensors)."""
    bits, k = config.ring_bits, config.drop_bits
    n = _numel(x.shape)
    m = 0 if payload is None or n == 0 else _numel(payload.shape)
    if party.role == ROLE_HELPER:
        if n:
            _helper_core(party, n, m, bits, index)
        return None, None
    j = party.role
    if j not in (ROLE_CLIENT, ROLE_SERVER):
        raise ValueError(f"unknown role {party.role}")
    other = 1 - j
    dev = x.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return (empty if want_bits else None), (torch.zeros(m, dtype=torch.int64, device=dev)
                                                 if payload is not None else None)
    if x.dtype != torch.int64:
        raise TypeError(f"DReLU expects int64 shares, got {x.dtype}")
    low, top = bits - 1, _all_ones(bits)
    xf = x.reshape(-1)
    t = xf if (bits == 64 and k == 0) else (xf >> k) & top   # logical shift: top < 2^(64−k)
    # round 1: open x̂ = t + r mod L; send the masked payload to P2
    a_mine = (t + _pair_ring(party, ROLE_HELPER, n, bits, "dr.r")) & top
    party.send(other, pack_elements(a_mine, bits))
    if m:
        # z = v + m reaches P2 as two messages, v0 + m + ζ and v1 − ζ: m and ζ come from the
        # P0–P1 key, which P2 does not hold. Without ζ, P1's message would be its raw share,
        # whose masks P2 dealt (docs/secure_inference.md, "View table").
        mask = party.pair_random(other, (m,), tag="mul.m")
        zeta = party.pair_random(other, (m,), tag="mul.zeta")
        v = payload.reshape(-1)
        party.send(ROLE_HELPER, v + mask + zeta if j == 0 else v - zeta)
    # the comparison's randomness does not depend on x̂: draw it while the messages travel
    beta = _pair_bits(party, other, n, "dr.beta")
    rnd = _compare_randomness(party, other, n, low, "dr.pc")
    if j == 0:
        rbits = _pair_small(party, ROLE_HELPER, n * low, P, "dr.rbits").view(n, low)
    else:
        deal = party.recv(ROLE_HELPER, (zp_packed_bytes(n * low),), torch.uint8)
        rbits = unpack_zp(deal, n * low, source="P2").view(n, low)
    a_other = unpack_elements(party.recv(other, (pack_bytes(n, bits),), torch.uint8), n, bits,
                              source=f"P{other}")
    xhat = (a_mine + a_other) & top
    # round 2: PrivateCompare(bits of r', x̂', β) → P2 learns β ⊕ [r' > x̂']
    msg = private_compare_packed(j, rbits, xhat & _all_ones(low), beta, rnd, low)
    party.send(ROLE_HELPER, msg)
    del rbits, rnd, msg
    # round 3: shares of s = MSB(r) ⊕ β' over Z_2^64; DReLU = g ⊕ s
    g = 1 ^ ((xhat >> low) & 1) ^ beta
    if j == 0:
        s = party.pair_random(ROLE_HELPER, (n,), tag="out.s")
        sz = party.pair_random(ROLE_HELPER, (m,), tag="out.sz") if m else None
    else:
        got = party.recv(ROLE_HELPER, (n + m,))
        s, sz = got[:n], (got[n:] if m else None)
    bits_out = (j * g + (1 - 2 * g) * s) if want_bits else None
    prod = None
    if m:
        sel = s if index is None else s[index]
        gi = g if index is None else g[index]
        vs = sz - mask * sel
        prod = torch.where(gi.bool(), v - vs, vs)
    elif payload is not None:
        prod = torch.zeros(0, dtype=torch.int64, device=dev)
    return bits_out, prod


def _shape_of(x: torch.Tensor | tuple | list) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(int(s) for s in x)


def drelu(party: Party, x: torch.Tensor, config: DReLUConfig | None = None, *,
          scope: str = "drelu") -> torch.Tensor:
    """Shares over Z_2^64 of DReLU(x) = [x ≥ 0] for shares ``x`` (int64, any shape).

    P2 passes a shape-only tensor (``party.placeholder(shape)``) and gets one back. ``config``
    selects the exact or an approximate DReLU (default: the session's, see
    :func:`set_default_config`). Cost: :func:`drelu_bytes`, :data:`ROUNDS` rounds.
    """
    cfg = resolve_config(party, config)
    shape = _shape_of(x)
    with party.scope(scope):
        if party.role == ROLE_HELPER:
            _drelu_core(party, torch.empty(shape, device="meta"), cfg, None, None, False)
            return party.placeholder(shape)
        out, _ = _drelu_core(party, x, cfg, None, None, True)
    return out.view(shape)


def mul_drelu(party: Party, d: torch.Tensor, v: torch.Tensor,
              index: torch.Tensor | None = None, config: DReLUConfig | None = None, *,
              want_drelu: bool = False, scope: str = "mul_drelu"
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Shares of v · DReLU(d[index]) in one DReLU (no extra round; 24 bytes per value of v).

    ``d``: shares of the decision values (any shape, flattened); ``v``: shares of the payload
    (any shape); ``index``: for each flattened payload value, the flattened decision it uses
    (int64, public; None: ``v`` has d's shape and uses its own element). Returns shares shaped
    like ``v`` (and the DReLU shares too when ``want_drelu``); P2 passes placeholders and gets
    placeholders back. Used for ReLU (d = v = x), Block-ReLU (d = patch sums, v = pixels) and
    max (d = v = a − b).
    """
    cfg = resolve_config(party, config)
    dshape, vshape = _shape_of(d), _shape_of(v)
    n, m = _numel(dshape), _numel(vshape)
    if index is None:
        if dshape != vshape:
            raise ValueError(f"without an index, d and v must have the same shape, got "
                             f"{list(dshape)} and {list(vshape)}")
    else:
        index = index.reshape(-1)
        if index.numel() != m or index.dtype != torch.int64:
            raise ValueError(f"index must be int64 with one entry per payload value ({m}), got "
                             f"{index.numel()} ({index.dtype})")
        if m and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"index entries must lie in [0, {n})")
    with party.scope(scope):
        if party.role == ROLE_HELPER:
            _drelu_core(party, torch.empty(dshape, device="meta"), cfg,
                        torch.empty(vshape, device="meta"), index, False)
            out = party.placeholder(vshape)
            return (party.placeholder(dshape), out) if want_drelu else out
        if d.dtype != torch.int64 or v.dtype != torch.int64:
            raise TypeError("mul_drelu expects int64 shares")
        bits_out, prod = _drelu_core(party, d, cfg, v, index, want_drelu)
    prod = prod.view(vshape)
    return (bits_out.view(dshape), prod) if want_drelu else prod
