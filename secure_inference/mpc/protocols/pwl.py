"""Continuous piecewise-linear functions as sums of ReLUs: the public tables behind the secure
clamp, hardsigmoid and the approximated sigmoid, tanh, SiLU and GELU.

A continuous piecewise-linear function with knots t_1 < … < t_k is exactly

    g(x) = a + b·x + Σ_i c_i · ReLU(x − t_i)

(b the slope left of t_1, c_i the change of slope at t_i). On shares that is ONE batched
ReLU call over the k shifted copies of x (k DReLUs per element, 3 rounds: the rounds of a
single ReLU) plus a local sum with public coefficients; integer coefficients (clamp, ReLU6)
need no truncation and are exact.

The smooth activations are approximated by such a g (:func:`approximation`): k knots placed
with density ∝ |f''|^(1/2) over [−T, T] (the asymptotically best placement for linear
interpolation in the max norm), tails equal to f's asymptotes (0 or 1, −1 or 1, 0 or x), and
the inner knot values moved off the curve by a few equalising passes so each segment's largest
error is about the same on both signs (a crude Remez step; about 0.7× the plain interpolation
error). The stated maximum error (:attr:`PiecewiseLinear.max_error`) is measured on a
200,001-point grid over [−4T, 4T] plus the most the error can move between two grid points
(the sum of both slopes' bounds times half the step; outside [−T, T] every table equals f's asymptote, whose
distance to f only shrinks away from zero); ``tests/mpc/test_activations.py`` checks it on
an independent, denser and wider grid.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["PiecewiseLinear", "approximation", "APPROXIMATED", "clamp_pwl", "hardsigmoid_pwl",
           "exact_function"]


@dataclass(frozen=True)
class PiecewiseLinear:
    """g(x) = offset + slope·x + Σ coefs[i]·ReLU(x − knots[i]) (public)."""

    knots: tuple[float, ...]
    coefs: tuple[float, ...]
    slope: float = 0.0
    offset: float = 0.0
    max_error: float = 0.0     # max |g − f| over the reals for the function it approximates

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) in the dtype of x (the plaintext reference of the secure evaluation)."""
        y = self.offset + self.slope * x
        for t, c in zip(self.knots, self.coefs):
            y = y + c * torch.relu(x - t)
        return y

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """g'(x) (right derivative at the knots)."""
        d = torch.full_like(x, self.slope)
        for t, c in zip(self.knots, self.coefs):
            d = d + c * (x >= t).to(x.dtype)
        return d

    @property
    def integer(self) -> bool:
        """Whether every coefficient is an integer (then the secure sum needs no truncation)."""
        return all(float(c).is_integer() for c in self.coefs + (self.slope,))


def clamp_pwl(lo: float | None, hi: float | None) -> PiecewiseLinear:
    """clamp(x, lo, hi) (hardtanh, ReLU6; either bound may be None): exact, one knot per bound."""
    if lo is None and hi is None:
        raise ValueError("clamp needs at least one bound")
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"clamp needs lo < hi, got {lo}, {hi}")
    if lo is None:
        return PiecewiseLinear((float(hi),), (-1.0,), slope=1.0)
    if hi is None:
        return PiecewiseLinear((float(lo),), (1.0,), offset=float(lo))
    return PiecewiseLinear((float(lo), float(hi)), (1.0, -1.0), offset=float(lo))


def hardsigmoid_pwl() -> PiecewiseLinear:
    """torch's hardsigmoid, ReLU6(x + 3)/6: exact (two knots, coefficients ±1/6)."""
    return PiecewiseLinear((-3.0, 3.0), (1 / 6, -1 / 6))


# name: (the exact function in float64, left asymptote (a, b), right asymptote (a, b),
#        knots, half-width T of the knot range)
_SPECS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[float, float],
                        tuple[float, float], int, float]] = {
    "sigmoid": (torch.sigmoid, (0.0, 0.0), (1.0, 0.0), 8, 5.0),
    "tanh": (torch.tanh, (-1.0, 0.0), (1.0, 0.0), 10, 3.0),
    "silu": (F.silu, (0.0, 0.0), (0.0, 1.0), 10, 6.5),
    "gelu": (F.gelu, (0.0, 0.0), (0.0, 1.0), 10, 3.0),
}
APPROXIMATED = tuple(_SPECS)
"""The smooth activations with a piecewise-linear table."""


def exact_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exact activation a table approximates (float64 torch)."""
    return _SPECS[name][0]


def _interp(t: torch.Tensor, v: torch.Tensor, left, right, x: torch.Tensor) -> torch.Tensor:
    """The continuous piecewise-linear function through (t, v) with the given tails."""
    i = torch.searchsorted(t, x).clamp(1, len(t) - 1)
    t0, t1, v0, v1 = t[i - 1], t[i], v[i - 1], v[i]
    y = v0 + (v1 - v0) * (x - t0) / (t1 - t0)
    y = torch.where(x < t[0], left[0] + left[1] * x, y)
    return torch.where(x > t[-1], right[0] + right[1] * x, y)


@functools.lru_cache(maxsize=None)
def approximation(name: str) -> PiecewiseLinear:
    """The piecewise-linear table of a smooth activation (``APPROXIMATED``), built
    deterministically (the same on every party; see the module docstring)."""
    if name not in _SPECS:
        raise ValueError(f"no piecewise-linear table for {name!r}; known: {APPROXIMATED}")
    f, left, right, k, half = _SPECS[name]
    dt = torch.float64
    g = torch.linspace(-half, half, 4001, dtype=dt)
    y = f(g)
    step = float(g[1] - g[0])
    d2 = (y[2:] - 2 * y[1:-1] + y[:-2]).abs() / step ** 2
    dens = d2.sqrt() + 1e-3 * float(d2.sqrt().max())
    cum = torch.cat([torch.zeros(1, dtype=dt), torch.cumsum(dens, 0)])
    cum = cum / cum[-1]
    grid = torch.linspace(-half, half, len(cum), dtype=dt)
    t = _lerp(torch.linspace(0, 1, k, dtype=dt), cum, grid)
    v = f(t).clone()
    v[0] = left[0] + left[1] * t[0]
    v[-1] = right[0] + right[1] * t[-1]
    frac = torch.linspace(0, 1, 400, dtype=dt)
    seg = t[:-1, None] + (t[1:] - t[:-1])[:, None] * frac           # [k-1, 400] per segment
    fseg = f(seg)
    for _ in range(60):
        e = v[:-1, None] + (v[1:] - v[:-1])[:, None] * frac - fseg
        worst = e.gather(1, e.abs().argmax(1, keepdim=True))[:, 0]
        v[1:-1] -= (worst[:-1] + worst[1:]) / 4
    slopes = (v[1:] - v[:-1]) / (t[1:] - t[:-1])
    full = torch.cat([torch.tensor([left[1]], dtype=dt), slopes, torch.tensor([right[1]], dtype=dt)])
    coefs = full[1:] - full[:-1]
    offset = float(v[0] - left[1] * t[0])
    table = PiecewiseLinear(tuple(float(a) for a in t), tuple(float(c) for c in coefs),
                            slope=float(left[1]), offset=offset)
    xs = torch.linspace(-4 * half, 4 * half, 200_001, dtype=dt)
    step = float(xs[1] - xs[0])
    fx = f(xs)
    lip = float((fx[1:] - fx[:-1]).abs().max()) / step * 1.01 + \
        float(table.derivative(xs).abs().max())
    # between two grid points the error moves by at most (|f'| + |g'|)·step/2
    err = float((table(xs) - fx).abs().max()) + lip * step / 2
    return PiecewiseLinear(table.knots, table.coefs, table.slope, table.offset, err)


def _lerp(q: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp(q, xp, fp) for increasing xp."""
    i = torch.searchsorted(xp, q).clamp(1, len(xp) - 1)
    w = (q - xp[i - 1]) / (xp[i] - xp[i - 1]).clamp_min(1e-300)
    return fp[i - 1] + w * (fp[i] - fp[i - 1])
