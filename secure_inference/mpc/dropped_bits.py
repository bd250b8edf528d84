"""Low bits a ReLU layer's comparison may drop: chosen on calibration data, per layer, within a
stated error budget (opt-in; the default keeps every comparison exact within its range).

A DReLU that drops the d low bits of its input (:class:`~.settings.DReLUConfig` with
``drop_bits=d``: each party shifts its share right by d before the comparison, which then runs
over d fewer bits) decides every input correctly except small positive ones: an input of u
fixed-point units with 0 ≤ u < 2^d is reported negative with probability (2^d − 1 − u) / 2^d
over the sharing (:meth:`~.settings.DReLUConfig.error_probability`). A ReLU whose bit is
wrong outputs 0 instead of x, an error of at most 2^(d−f) real units (f fractional bits), never
anything else. Dropping d bits saves d/ℓ of the comparison's bytes and work (ℓ the layer's
calibrated width).

The rule (:func:`choose_drop`): for a ReLU layer with comparison inputs x_i on the calibration
images, the expected absolute error d dropped bits add to its output is

    E(d) = Σ_i  x_i · P(bit wrong | x_i)      (only 0 ≤ u_i < 2^d − 1 contribute),

and the layer drops the most bits with ``E(d) ≤ budget · Σ_i relu(x_i)``: the expected error
is at most ``budget`` times the layer's output L1 norm (``budget=0.01``: 1%). Only plain ReLU
layers drop bits: a Block-ReLU decision that flips zeroes or keeps a whole patch, and a
max-pool comparison picks between values, so they would need rules of their own.

What it reveals: the number of dropped bits per layer is public, like the width (it is part of
the program and its fingerprint), and says, to all three parties, how many of the server's
activations on the calibration images were small; nothing about any client's image. A wrong
bit is a wrong answer, never a leak: the messages are masked exactly as at full width.
"""
from __future__ import annotations

import math

import torch

__all__ = ["MAX_DROP", "DropErrorAccumulator", "choose_drop"]

MAX_DROP = 48
"""Most bits a layer may drop (the compiler also keeps at least 3 compared bits)."""


class DropErrorAccumulator:
    """Running E(d) for d = 0..``max_drop`` and the output L1 norm of one ReLU layer over
    calibration batches (sort once per batch; prefix sums give every d at once)."""

    def __init__(self, frac_bits: int, max_drop: int = MAX_DROP) -> None:
        self.frac_bits = int(frac_bits)
        self.max_drop = int(max_drop)
        self.errors = [0.0] * (self.max_drop + 1)
        self.l1 = 0.0

    def add(self, x: torch.Tensor) -> None:
        """Account the comparison inputs ``x`` (real units) of one batch."""
        x = x.double().reshape(-1)
        self.l1 += float(torch.relu(x).sum())
        u = torch.round(x * 2.0 ** self.frac_bits)
        u = u[(u >= 0) & (u < 2.0 ** self.max_drop)].sort().values
        if not u.numel():
            return
        zero = u.new_zeros(1)
        s1 = torch.cat([zero, torch.cumsum(u, 0)])          # prefix sums, s[k]: k smallest
        s2 = torch.cat([zero, torch.cumsum(u * u, 0)])
        spans = 2.0 ** torch.arange(1, self.max_drop + 1, dtype=u.dtype)
        k = torch.searchsorted(u, spans - 1)                 # values u < span − 1, every d
        # Σ u·(span − 1 − u)/span over them, in real units
        err = ((spans - 1) * s1[k] - s2[k]) / spans * 2.0 ** -self.frac_bits
        for d, e in enumerate(err.tolist(), start=1):
            self.errors[d] += e

    def choose(self, budget: float) -> int:
        """:func:`choose_drop` of what was accumulated."""
        return choose_drop(self.errors, self.l1, budget)


def choose_drop(errors: list[float], l1: float, budget: float) -> int:
    """The largest d with ``errors[d] ≤ budget · l1`` (errors[d]: E(d), non-decreasing in d);
    0 for a zero budget or a layer whose output is all zero."""
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"the drop budget must be a finite number >= 0, got {budget!r}")
    if budget == 0 or l1 <= 0:
        return 0
    best = 0
    for d in range(1, len(errors)):
        if errors[d] > budget * l1:
            break
        best = d
    return best
