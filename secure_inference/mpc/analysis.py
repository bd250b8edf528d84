"""Plaintext analyses of a compiled program: float64 execution (the reference a secure run is
checked against), the fixed-point error analysis and the expected truncation failures. Every
per-op rule comes from the op table (:mod:`.ops`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .ops import ErrorContext, op_of
from .program import Layer, Program, Weights

__all__ = ["run_float", "error_std", "error_bound", "truncation_failures"]


def run_float(program: Program, weights: Weights, x: torch.Tensor,
              hook: Callable[[Layer, list[torch.Tensor], torch.Tensor], None] | None = None,
              flips: Sequence[tuple[str, int, int, int, int]] = ()) -> torch.Tensor:
    """Run the compiled program in float64 on plaintext ``x``; should equal the torch model.

    ``hook(layer, inputs, output)`` is called after every layer (used by the error analysis);
    ``flips`` lists Block-ReLU decisions (layer name, image, channel, patch row, patch column)
    to take the other way (how much a decision the secure run might flip can move the output).
    """
    vals: list[torch.Tensor] = []
    for layer in program.layers:
        ins = [vals[j] for j in layer.inputs]
        y = x.double() if layer.op == "input" else op_of(layer).run_float(layer, ins, weights,
                                                                         flips)
        if hook is not None:
            hook(layer, ins, y)
        vals.append(y)
    return vals[program.output]


def error_std(program: Program, weights: Weights, x: torch.Tensor, frac_bits: int
              ) -> tuple[torch.Tensor, list[tuple[str, int, int, int, int]]]:
    """First-order fixed-point error analysis: per output value, the standard deviation of
    (secure output − plaintext output) for input ``x``, and the Block-ReLU decisions
    (patches of more than one pixel; as ``run_float`` flips) whose plaintext input lies
    within 8 of its own standard deviations of zero ("ambiguous": the secure run may decide
    them the other way). Each op's rule is its ``error_var`` in :mod:`.ops`.

    Worst-case interval bounds grow like the product of the layers' weight L1 norms (useless:
    above 10^17 for ResNet18), but the rounding errors are independent and zero-mean-ish, so
    their *variances* propagate through the network linearised at ``x``:

    * input encoding: uniform rounding, variance lsb²/12 (lsb = 2^-f);
    * conv/linear: ``var_out = conv(var_in, W²) + conv(x², lsb²/12) + t``: the incoming error
      through the weights, the weights' own encoding error, and the local truncation, which
      is floor ± 1 lsb, taken as uniform in ±2 lsb (t = 4·lsb²/3, covers its bias too);
    * (Block-)ReLU: the variance passes where the plaintext keeps the value, else 0 (a ReLU
      is 1-Lipschitz anyway; a Block-ReLU patch decided the other way is an error of the
      patch's size, which is why ambiguous decisions are counted); Block-ReLU6 likewise, its
      pixels set to 6 carrying no error and its decisions near 0 or near 6 ambiguous;
    * max pooling: the variance of the selected element; average pooling and resizing:
      the weighted sum of variances plus truncation and reciprocal rounding; add: sum;
    * clamp/ReLU6, hardsigmoid and the piecewise-linear tables: the variance through the
      table's slope plus the encodings of its knots and coefficients and one truncation; a
      table that *approximates* sigmoid/tanh/SiLU/GELU adds its maximum error squared (a
      bounded error, so its variance is at most that), which makes the bound one on the
      distance to the exact float model; products: y²·var(x) + x²·var(y) + truncation.

    With the exact DReLU, no catastrophic truncation failure (probability 2^(l+1-64) per
    truncated value of magnitude < 2^l, see :mod:`.ring`) and no ambiguous decision, the
    error of a value exceeds 8 standard deviations with negligible probability. An ambiguous
    decision may flip; :func:`error_bound` adds the effect of flipping each one.
    """
    ctx = ErrorContext(frac_bits)
    vars_: list[torch.Tensor] = []

    def hook(layer: Layer, ins: list[torch.Tensor], y: torch.Tensor) -> None:
        v_in = [vars_[j] for j in layer.inputs]
        vars_.append(op_of(layer).error_var(layer, ins, v_in, y, weights, ctx))

    run_float(program, weights, x.double(), hook=hook)
    return vars_[program.output].sqrt(), ctx.ambiguous


def truncation_failures(program: Program, weights: Weights, x: torch.Tensor, frac_bits: int
                        ) -> dict[str, float]:
    """Expected number of catastrophic local-truncation failures per image for input ``x``.

    Local truncation of a value whose ring integer before the shift is v fails (the result is
    off by about 2^(64 − shift)) exactly when the two shares wrap around 2^64, which happens
    with probability |v| / 2^64 over the uniform share (see :mod:`.ring`). v is the real
    value times 2^(scale): 2^(2f) after a conv/linear layer or a fractional public multiplier
    or resize matrix, 2^(f+k) in an average pooling (k the reciprocal's shift, or log2 of a
    power-of-two divisor). Returns ``{"per_image": expected failures per image, "values":
    truncated values per image, "by_layer": {name: expected failures per image}}``. The
    expectation grows like 2^(2f): one more fractional bit quadruples it.
    """
    two64 = 2.0 ** 64
    images = x.shape[0]
    by_layer: dict[str, float] = {}
    count = 0

    def hook(layer: Layer, ins: list[torch.Tensor], y: torch.Tensor) -> None:
        nonlocal count
        for ring_values in op_of(layer).truncated(layer, ins, y, weights, frac_bits):
            by_layer[layer.name] = by_layer.get(layer.name, 0.0) + \
                float(ring_values.abs().sum()) / two64 / images
            count += ring_values.numel()

    run_float(program, weights, x.double(), hook=hook)
    return {"per_image": sum(by_layer.values()), "values": count / images, "by_layer": by_layer}


def error_bound(program: Program, weights: Weights, x: torch.Tensor, frac_bits: int, *,
                sigmas: float = 8.0, max_flips: int = 256, with_failures: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Elementwise bound on |secure − plaintext| output for input ``x``: ``sigmas`` standard
    deviations of :func:`error_std`, plus, for every ambiguous Block-ReLU decision, the change
    of the output when that decision alone is flipped (a union over flips, first order).

    The bound holds unless a local truncation fails catastrophically; ``with_failures=True``
    also returns :func:`truncation_failures` (the expected number of such failures per image,
    which should be far below 1/images-you-care-about: lower ``frac_bits`` if it is not)."""
    if with_failures:
        return (error_bound(program, weights, x, frac_bits, sigmas=sigmas, max_flips=max_flips),
                truncation_failures(program, weights, x, frac_bits))
    std, ambiguous = error_std(program, weights, x, frac_bits)
    if len(ambiguous) > max_flips:
        raise ValueError(f"{len(ambiguous)} ambiguous Block-ReLU decisions (more than "
                         f"{max_flips}); use more fractional bits")
    bound = sigmas * std
    if ambiguous:
        base = run_float(program, weights, x)
        n = x.shape[0]
        chunk = max(1, 64 // n)
        for start in range(0, len(ambiguous), chunk):  # one flip per copy of the batch
            part = ambiguous[start:start + chunk]
            reps = run_float(program, weights, x.repeat(len(part), *([1] * (x.dim() - 1))),
                             flips=[(name, k * n + i, c, r, q)
                                    for k, (name, i, c, r, q) in enumerate(part)])
            bound = bound + (reps.reshape(len(part), *base.shape) - base).abs().sum(0)
    return bound
