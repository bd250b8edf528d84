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
import torch

from ... import wire_costs
from ..runtime import Party
from ..session import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER
from ..settings import EXACT, DReLUConfig
from ..errors import ProtocolError
from . import drelu_kernels as DK
from .pair_random import pair_bits, pair_ring, pair_small
from .private_compare import (bit_decompose, compare_randomness, deal_corrections,
                              plain_private_compare, private_compare_decide,
                              private_compare_decide_packed, private_compare_from_words,
                              private_compare_message, private_compare_packed)
from .zp import (P, all_ones, checked_words, pack_bytes, pack_elements, pack_zp,
                 unpack_elements, unpack_zp, zp_packed_bytes)

__all__ = ["P", "ROUNDS", "DReLUConfig", "EXACT", "drelu", "mul_drelu", "drelu_bytes",
           "mul_drelu_bytes", "zp_packed_bytes", "pack_zp", "unpack_zp", "pack_elements",
           "unpack_elements", "private_compare_message", "private_compare_decide",
           "private_compare_packed", "private_compare_decide_packed",
           "plain_private_compare", "plain_drelu", "set_default_config", "resolve_config",
           "bit_decompose"]

ROUNDS = 3                  # rounds of one (batched) DReLU or fused DReLU-multiplication


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------



def set_default_config(party: Party, config: DReLUConfig | None) -> None:
    """Make ``config`` this session's DReLU for every call that passes ``config=None``.

    All three parties must set the same configuration (it changes message sizes).
    """
    if config is None:
        party.drelu = EXACT
    elif not isinstance(config, DReLUConfig):
        raise TypeError(f"expected a DReLUConfig, got {type(config).__name__}")
    else:
        party.drelu = config


def resolve_config(party: Party, config: DReLUConfig | None) -> DReLUConfig:
    """``config`` if given, else the session default (:func:`set_default_config`), else exact."""
    if config is not None:
        if not isinstance(config, DReLUConfig):
            raise TypeError(f"expected a DReLUConfig, got {type(config).__name__}")
        return config
    return party.drelu


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------

def drelu_bytes(n: int, config: DReLUConfig = EXACT) -> int:
    """Payload bytes of one batched DReLU of ``n`` elements, summed over all parties
    (:func:`secure_inference.wire_costs.drelu_bytes` at the config's ring width)."""
    return wire_costs.drelu_bytes(n, config.ring_bits)


def mul_drelu_bytes(n: int, m: int, config: DReLUConfig = EXACT) -> int:
    """Payload bytes of :func:`mul_drelu` with ``n`` decisions and ``m`` payload values."""
    return wire_costs.mul_drelu_bytes(n, m, config.ring_bits)


def plain_drelu(x: torch.Tensor) -> torch.Tensor:
    """Reference DReLU on plaintext int64 values: 1 where x ≥ 0 (int64)."""
    return (x >= 0).to(torch.int64)


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return int(math.prod(shape))


def _helper_core(party: Party, n: int, m: int, bits: int,
                 index: torch.Tensor | None) -> None:
    """P2's side of :func:`_drelu_core`."""
    low = bits - 1
    # deal: r = r0 + r1 (both free); P1's shares of the bits of r' are corrections
    r = (pair_ring(party, ROLE_CLIENT, n, bits, "dr.r")
         + pair_ring(party, ROLE_SERVER, n, bits, "dr.r")) & all_ones(bits)
    rbits0 = pair_small(party, ROLE_CLIENT, n * low, P, "dr.rbits")
    party.send(ROLE_SERVER, deal_corrections(r, rbits0, low))
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
    low, top = bits - 1, all_ones(bits)
    xf = x.reshape(-1)
    host = dev.type == "cpu"        # one-pass numba kernels (:mod:`.drelu_kernels`)
    # round 1: open x̂ = t + r mod L, t = x (exact) or ⌊x/2^k⌋ mod L (logical shift:
    # top < 2^(64−k)); send the masked payload to P2
    r_mine = pair_ring(party, ROLE_HELPER, n, bits, "dr.r")
    if host:
        a_mine = DK.mask_input(xf, r_mine, bits, k)
    else:
        t = xf if (bits == 64 and k == 0) else (xf >> k) & top
        a_mine = (t + r_mine) & top
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
    beta = pair_bits(party, other, n, "dr.beta")
    rnd = compare_randomness(party, other, n, low, "dr.pc")
    rwords = None   # P1 on a CPU: the dealt shares stay packed until the message kernel
    if j == 0:
        rbits = pair_small(party, ROLE_HELPER, n * low, P, "dr.rbits").view(n, low)
    else:
        deal = party.recv(ROLE_HELPER, (zp_packed_bytes(n * low),), torch.uint8)
        if host:
            rbits, rwords = None, checked_words(deal, n * low, "P2")
        else:
            rbits = unpack_zp(deal, n * low, source="P2").view(n, low)
        del deal
    opened = party.recv(other, (pack_bytes(n, bits),), torch.uint8)
    if host:
        status, xlow, g = DK.combine_opened(a_mine, opened, bits, beta)
        if status != DK.OK:
            raise ProtocolError(f"P{other}: element wider than {bits} bits (malformed message)")
    else:
        xhat = (a_mine + unpack_elements(opened, n, bits, source=f"P{other}")) & top
        xlow, g = xhat & all_ones(low), 1 ^ ((xhat >> low) & 1) ^ beta
        del xhat
    del opened
    # round 2: PrivateCompare(bits of r', x̂', β) → P2 learns β ⊕ [r' > x̂']
    if rwords is not None:
        msg = private_compare_from_words(j, rwords, xlow, beta, rnd, low)
    else:
        msg = private_compare_packed(j, rbits, xlow, beta, rnd, low)
    party.send(ROLE_HELPER, msg)
    del rbits, rwords, rnd, msg, xlow
    # round 3: shares of s = MSB(r) ⊕ β' over Z_2^64; DReLU = g ⊕ s (g = 1 ⊕ MSB(x̂) ⊕ β)
    if j == 0:
        s = party.pair_random(ROLE_HELPER, (n,), tag="out.s")
        sz = party.pair_random(ROLE_HELPER, (m,), tag="out.sz") if m else None
    else:
        got = party.recv(ROLE_HELPER, (n + m,))
        s, sz = got[:n], (got[n:] if m else None)
    prod = None
    if m and host:
        prod = DK.mul_output(g, s, sz, mask, v, index)
    elif m:
        sel = s if index is None else s[index]
        gi = g if index is None else g[index]
        vs = sz - mask * sel
        prod = torch.where(gi.bool(), v - vs, vs)
    elif payload is not None:
        prod = torch.zeros(0, dtype=torch.int64, device=dev)
    bits_out = None
    if want_bits:
        bits_out = DK.drelu_output(j, g, s) if host else j * g + (1 - 2 * g) * s
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
