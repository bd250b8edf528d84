"""Calibration: the DReLU input ranges and the fixed-point headroom of a model, recorded on
calibration images, so that each DReLU layer can compare only the bits it needs.

One step after finetuning (``si-calibrate``): the calibration images run through the plaintext
(float64) program with its block spec; for every DReLU layer the largest |input| of its
comparisons is recorded (ReLU inputs, Block-ReLU patch sums, Block-ReLU6 patch sums S and
S − 6·n, max-pool window spreads), and for
the whole program the largest activation and the largest ring value a local truncation sees.
The result is a spec (:class:`~secure_inference.spec.BlockSpec`) that carries the ranges; the
compiler turns them into per-layer comparison widths (:func:`~.trace.assign_widths`).

Refused (:class:`HeadroomError`): a model whose values leave less than ``margin`` times their
size of room in the 64-bit ring at ``frac_bits`` (the product of two encodings, 2^(2f) times
the real value, must stay far below 2^63, else local truncations fail and the secure output is
garbage without a word). The ranges are public; see :mod:`secure_inference.widths` for what
they reveal and what happens to inputs outside them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..spec import BlockSpec
from ..widths import (DEFAULT_MARGIN, FULL_WIDTH, Calibration, CalibrationError,
                      width_range)
from .analysis import run_float
from .costs import layer_cost
from .dropped_bits import DropErrorAccumulator
from .ops import DROP_ATTR, WIDTH_ATTR, layer_drelus, op_of
from .program import Layer, Program, Weights
from .protocols.relu import block_relu_plan
from .ring import DEFAULT_FRAC_BITS
from .trace import assign_widths, compile_model

__all__ = ["HeadroomError", "calibrate", "calibrate_program", "check_headroom",
           "check_failure_rate", "width_table", "bytes_saved_by_widths", "MIN_FRAC_BITS",
           "DEFAULT_MAX_FAILURES"]

MIN_FRAC_BITS = 8
"""Fewest fractional bits :class:`HeadroomError` suggests (below, the rounding error of every
weight and activation is larger than most networks tolerate)."""


DEFAULT_MAX_FAILURES = 1e-3
"""Most catastrophic truncation failures per image :func:`calibrate` accepts by default (one in
a thousand images with an output off by about 2^(64−2f)): the headroom check bounds the
largest value, this bounds their sum, which grows with the number of values."""


class HeadroomError(CalibrationError):
    """The model's values do not fit the fixed-point ring with the requested margin."""


@dataclass
class _Recorder:
    """Running maxima over calibration batches."""

    ranges: dict[str, float]
    max_activation: float = 0.0
    max_activation_layer: str = ""
    max_ring: float = 0.0
    max_ring_layer: str = ""
    nonfinite: str = ""          # the first layer with a NaN or infinite value
    failures: float = 0.0        # expected catastrophic truncation failures, all images


def _check_images(images: torch.Tensor, program: Program) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"calibration images must be a tensor [N, C, H, W], got "
                        f"{type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    want = tuple(program.input_shape[1:])
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"calibration images must be [N, {', '.join(map(str, want))}] (the "
                         f"compiled input size), got {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no calibration images: pass at least one (ideally hundreds of "
                         "training images)")
    if not images.is_floating_point():
        raise TypeError(f"calibration images must be preprocessed floats, got {images.dtype} "
                        "(uint8 pixels? normalise them as the model's data preprocessor does)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("calibration images contain NaN or infinite values")
    return images


def calibrate_program(program: Program, weights: Weights, images: torch.Tensor, *,
                      margin: float = DEFAULT_MARGIN, frac_bits: int = DEFAULT_FRAC_BITS,
                      batch_size: int = 32,
                      progress: Callable[[int], None] | None = None,
                      check: bool = True,
                      max_failures: float = DEFAULT_MAX_FAILURES,
                      drop_budget: float = 0.0) -> Calibration:
    """Record the ranges of ``program`` on ``images`` [N, C, H, W] (plaintext, float64).

    ``progress(n)`` is called after each batch of n images. With ``check`` (default) a
    program without ``margin`` times headroom at ``frac_bits``, or with more than
    ``max_failures`` expected truncation failures per image, raises :class:`HeadroomError`.
    ``drop_budget`` > 0 (opt-in) also chooses, per ReLU layer, the low bits its comparison
    may drop with an expected output error of at most that fraction of the layer's output L1
    norm (:mod:`.dropped_bits`).
    """
    if not max_failures >= 0:       # (inf: no limit)
        raise ValueError(f"max_failures must be a number >= 0, got {max_failures}")
    if not (math.isfinite(drop_budget) and drop_budget >= 0):
        raise ValueError(f"drop_budget must be a finite number >= 0, got {drop_budget}")
    images = _check_images(images, program)
    if not (math.isfinite(margin) and margin >= 1):
        raise ValueError(f"margin must be a finite number >= 1, got {margin}")
    rec = _Recorder(ranges={layer.name: 0.0 for layer in program.layers if layer_drelus(layer)})
    drops = {layer.name: DropErrorAccumulator(frac_bits) for layer in program.layers
             if drop_budget > 0 and layer.op == "relu"}

    def hook(layer: Layer, ins: list[torch.Tensor], y: torch.Tensor) -> None:
        op = op_of(layer)
        if layer.name in rec.ranges:
            cmp = op.comparison_inputs(layer, ins)
            if cmp is not None and cmp.numel():
                rec.ranges[layer.name] = max(rec.ranges[layer.name], float(cmp.abs().max()))
                if layer.name in drops:
                    drops[layer.name].add(cmp)
        if y.numel():
            top = float(y.abs().max())
            if not math.isfinite(top) and not rec.nonfinite:
                rec.nonfinite = layer.name
            if top > rec.max_activation:
                rec.max_activation, rec.max_activation_layer = top, layer.name
            ring = top * 2.0 ** frac_bits
            for values in op.truncated(layer, ins, y, weights, frac_bits):
                if values.numel():
                    ring = max(ring, float(values.abs().max()))
                    rec.failures += float(values.abs().sum()) / 2.0 ** 64
            if ring > rec.max_ring:
                rec.max_ring, rec.max_ring_layer = ring, layer.name

    bs = max(1, int(batch_size))
    for start in range(0, images.shape[0], bs):
        batch = images[start:start + bs].double()
        run_float(program, weights, batch, hook=hook)
        if progress is not None:
            progress(batch.shape[0])
    if rec.nonfinite or not math.isfinite(rec.max_ring):
        raise HeadroomError(f"the model produces NaN or infinite values on the calibration "
                            f"images (first at layer '{rec.nonfinite}'); check the weights and "
                            "the preprocessing")
    headroom = 2.0 ** 63 / rec.max_ring if rec.max_ring > 0 else float("inf")
    cal = Calibration(ranges=rec.ranges, margin=float(margin), images=int(images.shape[0]),
                      frac_bits=int(frac_bits), max_activation=rec.max_activation,
                      headroom=min(headroom, 1e300),
                      truncation_failures=rec.failures / images.shape[0],
                      drops={name: d for name, acc in drops.items()
                             if (d := acc.choose(drop_budget))},
                      drop_budget=float(drop_budget))
    if check:
        check_headroom(cal, where=rec.max_ring_layer, activation_layer=rec.max_activation_layer)
        check_failure_rate(cal, max_failures)
    return cal


def check_failure_rate(calibration: Calibration, max_failures: float = DEFAULT_MAX_FAILURES
                       ) -> None:
    """Raise :class:`HeadroomError` (what to do included) when the calibration images expect
    more than ``max_failures`` catastrophic truncation failures per image.

    Each local truncation of a ring value v fails with probability about |v|/2^64, putting an
    error near 2^(64−2f) into one value; the headroom check bounds the largest v, this the
    sum over all of them, which a large network can make too big even with ample headroom
    (one fractional bit less divides it by 4)."""
    rate, f = calibration.truncation_failures, calibration.frac_bits
    if rate <= max_failures:
        return
    need = math.ceil(math.log(rate / max_failures, 4)) if max_failures > 0 else 0
    lower = f - need
    fix = (f"run every party with --frac-bits {lower} (about "
           f"{1000 * rate / 4.0 ** need:.3g} per 1,000 images) and calibrate again with it"
           if max_failures > 0 and lower >= MIN_FRAC_BITS else
           "rescale the inputs or the weights and calibrate again")
    raise HeadroomError(
        f"too many expected truncation failures: on the calibration images, local truncations "
        f"at frac_bits={f} are expected to fail {1000 * rate:.3g} times per 1,000 images "
        f"(each failure puts an error near 2^{64 - 2 * f} into one value, a wrong output), "
        f"above the accepted {1000 * max_failures:.3g}; {fix}, or accept the rate with "
        f"--max-failures {rate:.2g}")


def check_headroom(calibration: Calibration, *, where: str = "", activation_layer: str = "",
                   frac_bits: int | None = None) -> None:
    """Raise :class:`HeadroomError` (what to do included) when the calibration's headroom at
    ``frac_bits`` (default: the calibration's) is below its margin."""
    f = calibration.frac_bits if frac_bits is None else int(frac_bits)
    headroom = calibration.headroom * 4.0 ** (calibration.frac_bits - f)
    if headroom >= calibration.margin:
        return
    # products carry 2^(2f): each fractional bit less gives 4x the room
    need = math.ceil(math.log(calibration.margin / headroom, 4))
    lower = f - need
    at = f" (largest ring value at layer '{where}')" if where else ""
    act = f" at layer '{activation_layer}'" if activation_layer else ""
    fix = (f"run every party with --frac-bits {lower} (or lower) and calibrate again with it"
           if lower >= MIN_FRAC_BITS else
           "the activations are too large for the fixed point at any useful precision: "
           "rescale the inputs or the weights (e.g. finetune with weight decay or clip the "
           "activations) and calibrate again")
    raise HeadroomError(
        f"fixed-point headroom too small: the largest activation is "
        f"{calibration.max_activation:.3g}{act}; at frac_bits={f} the ring values reach "
        f"2^{math.log2(2.0 ** 63 / headroom):.1f}{at}, leaving {headroom:.3g}x room below "
        f"2^63 where the margin asks for {calibration.margin:g}x (local truncations would fail "
        f"and the secure output would be wrong); {fix}")


def calibrate(model: nn.Module, images: torch.Tensor, spec: Mapping | None = None, *,
              margin: float = DEFAULT_MARGIN, frac_bits: int = DEFAULT_FRAC_BITS,
              batch_size: int = 32, progress: Callable[[int], None] | None = None,
              max_failures: float = DEFAULT_MAX_FAILURES, drop_budget: float = 0.0) -> BlockSpec:
    """A spec that carries the ranges of ``model`` (with ``spec`` applied) on ``images``.

    ``images``: preprocessed calibration images [N, C, H, W] (training images: the ranges
    become public). The returned :class:`~secure_inference.spec.BlockSpec` has the sites of
    ``spec`` and a :class:`~secure_inference.widths.Calibration`; save it with
    :func:`secure_inference.save_spec` and pass it wherever a spec goes (``compile_model``,
    ``run_local``, the party CLIs' ``--spec``): every calibrated DReLU layer then compares
    only the bits its range times ``margin`` needs. Raises :class:`HeadroomError` where the
    fixed point at ``frac_bits`` has less than ``margin`` times room, or where the images
    expect more than ``max_failures`` truncation failures per image
    (:func:`check_failure_rate`). ``drop_budget`` > 0 (opt-in; default exact) lets each ReLU
    layer drop the low bits whose expected error is at most that fraction of its output's
    L1 norm on ``images`` (:mod:`.dropped_bits`).
    """
    shape = tuple(images.shape[-3:])
    sites = dict(spec or {})
    program, weights = compile_model(model, (1,) + shape, spec=sites or None,
                                     drelu_width=FULL_WIDTH)
    cal = calibrate_program(program, weights, images, margin=margin, frac_bits=frac_bits,
                            batch_size=batch_size, progress=progress,
                            max_failures=max_failures, drop_budget=drop_budget)
    return BlockSpec(sites, cal)


def width_table(program: Program, calibration: Calibration | None = None, *,
                frac_bits: int = DEFAULT_FRAC_BITS, margin: float | None = None,
                batch: int = 1) -> list[dict[str, Any]]:
    """Per DReLU layer of ``program``: op, DReLUs and payload values per batch of ``batch``
    images, the calibrated range, the width the compiler gives it (after assigning the widths
    of ``calibration``, if given) and the low bits it drops, the range that width holds, and the exact online bytes of
    one batch at 64 bits and at that width (one batch packs its Z_67 values together, so
    a batch of b images may send a few bytes less than b single images)."""
    if calibration is not None:
        assign_widths(program, calibration, frac_bits=frac_bits, margin=margin)
    widths = program.widths()
    rows = []
    for layer in program.layers:
        if layer.name not in widths:
            continue
        n = layer_drelus(layer, batch)
        payload = _payload_values(layer, batch)
        width = widths[layer.name]
        rng = calibration.ranges.get(layer.name) if calibration is not None else None
        rows.append({"layer": layer.name, "op": layer.op, "drelus": n, "payload": payload,
                     "range": rng, "width": width,
                     "dropped_bits": int(layer.attrs.get(DROP_ATTR, 0)),
                     "holds": width_range(width, frac_bits) if width < FULL_WIDTH else None,
                     "bytes_64": _layer_bytes(program, layer, FULL_WIDTH, batch),
                     "bytes": _layer_bytes(program, layer, width, batch,
                                           int(layer.attrs.get(DROP_ATTR, 0)))})
    return rows


def bytes_saved_by_widths(program: Program, batch_sizes: list[int]) -> int:
    """Exact online bytes the program's comparison widths save over the 64-bit DReLU for a
    session of batches of ``batch_sizes`` images (add it to a calibrated run's measured bytes
    for the 64-bit figure; 0 for a program without widths)."""
    saved = 0
    for layer in program.layers:
        width = layer.attrs.get(WIDTH_ATTR)
        if width is None or not layer_drelus(layer):
            continue
        drop = int(layer.attrs.get(DROP_ATTR, 0))
        saved += sum(_layer_bytes(program, layer, FULL_WIDTH, b)
                     - _layer_bytes(program, layer, int(width), b, drop) for b in batch_sizes)
    return saved


def _payload_values(layer: Layer, batch: int) -> int:
    """Payload values (pixels multiplied by a decision) of a batch."""
    if layer.op in ("block_relu", "block_relu6"):
        plan = block_relu_plan((batch,) + tuple(layer.shape[1:]), layer.attrs["block_sizes"])
        return plan.pixels * (2 if layer.op == "block_relu6" else 1)
    return layer_drelus(layer, batch)


def _layer_bytes(program: Program, layer: Layer, width: int, batch: int, drop: int = 0) -> int:
    """Exact online payload bytes of one batch through a DReLU layer at ``width`` bits with
    ``drop`` low bits dropped (the program's cost model, :func:`~.costs.layer_cost`, with the
    layer's width and drop replaced)."""
    attrs = {k: v for k, v in layer.attrs.items() if k not in (WIDTH_ATTR, DROP_ATTR)}
    if width < FULL_WIDTH:
        attrs[WIDTH_ATTR] = int(width)
        if drop:
            attrs[DROP_ATTR] = int(drop)
    return layer_cost(program, dataclasses.replace(layer, attrs=attrs), batch)[0]
