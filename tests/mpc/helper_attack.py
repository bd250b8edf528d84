"""A hostile helper's weight-recovery attack (lattice reduction), kept in the tests only.

Setting: Conv2d(1→1, 2×2, padding 1, bias) then ReLU on an 8×8 image. The helper P2 dealt the
conv layer's correlated randomness, so it knows A (the client's input mask), B (the server's
weight mask) and c0, hence c1 = conv(A, B) − c0. If P2 ever received the server's raw share of
the conv output, z1 = conv(x, W) − conv(A, W) + bias + c1 (before truncation by 2^f), it
would know, for every output position k,

    Σ_i M[k, i]·W_i − t_k ≡ e_k (mod 2^64),  M[k, i] = conv(A, unit_i)[k],
    t_k = c1_k − 2^f·v1_k,  e_k = conv(x, W)_k + bias + δ_k (small: |e_k| < 2^40),

with v1 the truncated share it received and δ_k ∈ [0, 2^f) the truncation's rounding. Small
W and small e under known uniform M: a hidden-number problem that LLL solves from a dozen
outputs. :func:`recover_weights` builds that lattice, reduces it, and accepts a candidate
only if it explains *every* output (residual below 2^40 at all 81 positions), so it returns
None on a view that carries no such relation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RING = 1 << 64
E_BITS = 40          # |conv(x, W) + bias + δ| < 2^40 for |x|, |w| < 2 at f = 16
W_BITS = 18          # |W_int| < 2^18


def _lll(basis: list[list[int]], delta: tuple[int, int] = (99, 100)) -> list[list[int]]:
    """LLL reduction of independent integer row vectors, all in integer arithmetic (the
    integral variant: subdeterminants d_i and λ_ij = d_j·μ_ij instead of rationals)."""
    num, den = delta
    b = [list(r) for r in basis]
    n = len(b)
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))        # noqa: E731
    d = [0] * (n + 1)            # d[0] = 1, d[i + 1] = Gram determinant of b[0..i]
    lam = [[0] * n for _ in range(n)]
    d[0] = 1

    def gram(k: int) -> None:
        for j in range(k + 1):
            u = dot(b[k], b[j])
            for i in range(j):
                u = (d[i + 1] * u - lam[k][i] * lam[j][i]) // d[i]
            if j < k:
                lam[k][j] = u
            else:
                if u == 0:
                    raise ValueError("LLL needs linearly independent rows")
                d[k + 1] = u

    def red(k: int, l: int) -> None:
        if 2 * abs(lam[k][l]) > d[l + 1]:
            q = (2 * lam[k][l] + d[l + 1]) // (2 * d[l + 1])      # nearest integer
            b[k] = [x - q * y for x, y in zip(b[k], b[l])]
            lam[k][l] -= q * d[l + 1]
            for i in range(l):
                lam[k][i] -= q * lam[l][i]

    def swap(k: int, kmax: int) -> None:
        b[k], b[k - 1] = b[k - 1], b[k]
        for j in range(k - 1):
            lam[k][j], lam[k - 1][j] = lam[k - 1][j], lam[k][j]
        lk = lam[k][k - 1]
        bb = (d[k - 1] * d[k + 1] + lk * lk) // d[k]
        for i in range(k + 1, kmax + 1):
            t = lam[i][k]
            lam[i][k] = (d[k + 1] * lam[i][k - 1] - lk * t) // d[k]
            lam[i][k - 1] = (bb * t + lk * lam[i][k]) // d[k + 1]
        d[k] = bb

    gram(0)
    k, kmax = 1, 0
    while k < n:
        if k > kmax:
            kmax = k
            gram(k)
        red(k, k - 1)
        if den * d[k + 1] * d[k - 1] < num * d[k] * d[k] - den * lam[k][k - 1] ** 2:
            swap(k, kmax)
            k = max(1, k - 1)
        else:
            for l in range(k - 2, -1, -1):
                red(k, l)
            k += 1
    return b


def recover_weights(a_mask: torch.Tensor, b_mask: torch.Tensor, c0: torch.Tensor,
                    v1: torch.Tensor, frac_bits: int, equations: int = 10) -> torch.Tensor | None:
    """The server's encoded 2×2 weights from what P2 holds, or None if the view carries no
    relation that determines them. ``a_mask`` [1,1,8,8], ``b_mask`` [1,1,2,2] and ``c0``
    [1,1,9,9] are P2's own draws; ``v1`` the 81 values it received in the ReLU's round 1."""
    conv = lambda x, w: F.conv2d(x, w, None, 1, 1)          # noqa: E731 - int64 wraps mod 2^64
    c1 = conv(a_mask, b_mask) - c0
    units = torch.eye(4, dtype=torch.int64).view(4, 1, 2, 2)
    m = torch.stack([conv(a_mask, u.unsqueeze(0)).reshape(-1) for u in units], 1)   # [81, 4]
    t = (c1.reshape(-1) - (v1.reshape(-1).to(torch.int64) << frac_bits))
    mm = [[int(v) % RING for v in row] for row in m.tolist()]
    tt = [int(v) % RING for v in t.tolist()]
    scale_w, scale_t = 1 << (E_BITS - W_BITS), 1 << E_BITS
    rows = list(range(10, 10 + equations))                     # interior outputs: 4 taps each
    dim = 4 + len(rows) + 1
    basis = []
    for i in range(4):
        basis.append([scale_w if j == i else 0 for j in range(4)] + [mm[k][i] for k in rows] + [0])
    for n, _ in enumerate(rows):
        basis.append([0] * 4 + [RING if j == n else 0 for j in range(len(rows))] + [0])
    basis.append([0] * 4 + [(-tt[k]) % RING for k in rows] + [scale_t])
    assert all(len(r) == dim for r in basis)
    for row in _lll(basis):
        if abs(row[-1]) != scale_t or any(c % scale_w for c in row[:4]):
            continue
        sign = 1 if row[-1] > 0 else -1
        w = [sign * c // scale_w for c in row[:4]]
        resid = [(sum(mm[k][i] * w[i] for i in range(4)) - tt[k]) % RING for k in range(len(tt))]
        if all(min(r, RING - r) < 1 << E_BITS for r in resid):
            return torch.tensor(w, dtype=torch.int64).view(1, 1, 2, 2)
    return None
