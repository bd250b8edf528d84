"""Activations beyond ReLU on shares: clamp/hardtanh/ReLU6, hardsigmoid, hardswish and the
piecewise-linear approximations of sigmoid, tanh, SiLU and GELU (:mod:`.pwl`).

Every one is a public continuous piecewise-linear g(x) = a + b·x + Σ_i c_i·ReLU(x − t_i)
evaluated by :func:`piecewise_linear`: the k shifted copies x − t_i (P0 subtracts the public
knots) go through ONE fused DReLU-multiplication (:func:`~.drelu.mul_drelu` with d = v, i.e.
k ReLUs at once), then each party sums its shares with the public coefficients locally.
Integer coefficients (clamp, ReLU6) are used as they are (exact, no truncation); fractional ones
are encoded with f bits and the sum is truncated once.

========================  =======================  ===========  ==============================
function                  DReLUs per element       rounds       bytes per element (64-bit)
========================  =======================  ===========  ==============================
clamp / hardtanh / ReLU6  2 (1 with one bound)     3            2 × 199.2
hardsigmoid               2                        3            2 × 199.2
hardswish                 2, then a product        4            2 × 199.2 + 8 + 16·2
sigmoid, tanh, SiLU,      k (8, 10, 10, 10)        3            k × 199.2
GELU (approximated)
========================  =======================  ===========  ==============================

(199.2 = one ReLU at 64 bits, :func:`.relu.relu_bytes`; a calibrated width shrinks it.) The
messages are exactly those of a ReLU over k·n elements (same scopes, masks and view-table rows),
and hardswish's product is the Beaver product of :func:`.linear.mul`.
"""
from __future__ import annotations

import torch

from ..ring import encode
from ..runtime import Party
from ..session import ROLE_CLIENT, ROLE_HELPER
from .drelu import EXACT, DReLUConfig, mul_drelu, mul_drelu_bytes
from .linear import mul, truncate
from .pwl import PiecewiseLinear, hardsigmoid_pwl

__all__ = ["piecewise_linear", "piecewise_linear_bytes", "hardswish", "hardswish_bytes",
           "mul_bytes"]


def _coefficients(party: Party, g: PiecewiseLinear, device) -> tuple[torch.Tensor, int, int]:
    """(c_i and b as ring values, b's ring value, their shift): integers unscaled (shift 0),
    otherwise with f fractional bits."""
    shift = 0 if g.integer else party.frac_bits
    vals = torch.tensor(g.coefs + (g.slope,), dtype=torch.float64)
    enc = vals.round().to(torch.int64) if shift == 0 else encode(vals, shift)
    return enc[:-1].to(device), int(enc[-1]), shift


def piecewise_linear(party: Party, x: torch.Tensor, g: PiecewiseLinear,
                     config: DReLUConfig | None = None, *, scope: str = "pwl") -> torch.Tensor:
    """Shares of g(x) for shares ``x`` (any shape; P2: placeholder in, placeholder out)."""
    k = len(g.knots)
    shape = tuple(x.shape)
    n = int(torch.Size(shape).numel())
    if party.role == ROLE_HELPER:
        ph = party.placeholder((k * n,))
        mul_drelu(party, ph, ph, None, config, scope=scope)
        return party.placeholder(shape)
    if x.dtype != torch.int64:
        raise TypeError("shares must be int64 tensors (ring elements of Z_2^64)")
    flat = x.reshape(1, n)
    d = flat.expand(k, n).clone()
    if party.role == ROLE_CLIENT:
        knots = encode(torch.tensor(g.knots, dtype=torch.float64), party.frac_bits)
        d -= knots.to(x.device).view(k, 1)
    r = mul_drelu(party, d.reshape(-1), d.reshape(-1), None, config, scope=scope).view(k, n)
    c, b, shift = _coefficients(party, g, x.device)
    y = (r * c.view(k, 1)).sum(0)
    if b:
        y = y + b * flat[0]
    if shift:
        y = truncate(party, y, shift)
    if party.role == ROLE_CLIENT and g.offset:
        y = y + encode(torch.tensor(g.offset, dtype=torch.float64), party.frac_bits).to(x.device)
    return y.view(shape)


def piecewise_linear_bytes(n: int, g: PiecewiseLinear, config: DReLUConfig = EXACT) -> int:
    """Payload bytes (all parties) of :func:`piecewise_linear` on ``n`` elements."""
    k = len(g.knots)
    return mul_drelu_bytes(k * n, k * n, config)


def hardswish(party: Party, x: torch.Tensor, config: DReLUConfig | None = None, *,
              scope: str = "hardswish") -> torch.Tensor:
    """Shares of hardswish(x) = x · hardsigmoid(x): the exact hardsigmoid (two comparisons,
    scope ``<scope>/pwl``), then one Beaver product with x (scope ``<scope>/mul``) and its
    truncation: 4 rounds."""
    with party.scope(scope):
        h = piecewise_linear(party, x, hardsigmoid_pwl(), config, scope="pwl")
        return mul(party, x, h, scope="mul")


def mul_bytes(x_numel: int, y_numel: int, out_numel: int) -> int:
    """Payload bytes (all parties) of :func:`.linear.mul`: the helper's correction (8 per
    output value) and E, F each way (16 per element of each operand)."""
    return 8 * out_numel + 16 * (x_numel + y_numel)


def hardswish_bytes(n: int, config: DReLUConfig = EXACT) -> int:
    """Payload bytes (all parties) of :func:`hardswish` on ``n`` elements."""
    return piecewise_linear_bytes(n, hardsigmoid_pwl(), config) + mul_bytes(n, n, n)
