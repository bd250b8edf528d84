"""Calibrated comparison widths: the recorded input ranges of a program's DReLU layers, and the
smallest exact ring width that holds each range.

A DReLU over an ℓ-bit ring (:class:`secure_inference.mpc.settings.DReLUConfig` with
``ring_bits=ℓ``, no low bits dropped) is exact for every input x with −2^(ℓ−1) ≤ x < 2^(ℓ−1)
fixed-point units and costs about ℓ/64 of the 64-bit comparison's bytes and work
(:mod:`secure_inference.wire_costs`). Calibration (:func:`secure_inference.mpc.calibrate.calibrate`)
runs calibration images through the plaintext program and records, per DReLU layer, the largest
|input| of its comparisons (ReLU inputs, Block-ReLU patch sums, max-pool differences) in real
units. The compiler then gives each layer :func:`comparison_width` of that range times a safety
margin.

What is public: the ranges, the margin, the number of calibration images and the widths are part
of the program every party compiles (the program fingerprint covers the widths), like the
architecture and the block spec. They reveal, to all three parties, an upper bound on the
activations the server's model produces on the calibration images, layer by layer; nothing
about any client's image. What happens outside the range: an input beyond ±2^(ℓ−1) wraps in the
ℓ-bit ring and its sign comes out unspecified, so that one ReLU/patch/max decision may be wrong.
It is a wrong answer, never a leak: every message is still masked exactly as at 64 bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["DEFAULT_MARGIN", "FULL_WIDTH", "MIN_WIDTH", "RANGE_SLACK_UNITS", "CALIBRATION_KEY",
           "MAX_CALIBRATED_LAYERS", "Calibration", "CalibrationError", "comparison_width",
           "width_range"]

DEFAULT_MARGIN = 8.0
"""Default safety factor over the calibration maximum (2^3: three more bits per layer)."""
FULL_WIDTH = 64
MIN_WIDTH = 3
RANGE_SLACK_UNITS = 1 << 8
"""Fixed-point units added to every range: the secure values differ from the plaintext ones by
a few units per summed pixel (rounding and local truncation), and a Block-ReLU compares the
patch sum minus one."""
CALIBRATION_KEY = "__calibration__"
"""The reserved key under which a spec file carries its calibration (site names never start
with two underscores)."""
MAX_CALIBRATED_LAYERS = 1 << 16
_MAX_NAME = 1024


class CalibrationError(ValueError):
    """Calibration data that cannot be used: malformed, or for another program."""


def comparison_width(max_abs: float, frac_bits: int, margin: float = DEFAULT_MARGIN) -> int:
    """Smallest ring width ℓ (3 ≤ ℓ ≤ 64) whose exact DReLU holds every input of magnitude up
    to ``margin × max_abs`` real units at ``frac_bits`` fractional bits, plus
    :data:`RANGE_SLACK_UNITS`: 2^(ℓ−1) > bound."""
    if not (isinstance(max_abs, (int, float)) and math.isfinite(max_abs) and max_abs >= 0):
        raise CalibrationError(f"a calibrated range must be a finite number >= 0, got {max_abs!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 1):
        raise CalibrationError(f"the margin must be a finite number >= 1, got {margin!r}")
    scaled = max_abs * margin * 2.0 ** int(frac_bits)
    if scaled >= 2.0 ** 63:
        return FULL_WIDTH
    bound = math.ceil(scaled) + RANGE_SLACK_UNITS
    return min(FULL_WIDTH, max(MIN_WIDTH, bound.bit_length() + 1))


def width_range(ring_bits: int, frac_bits: int) -> float:
    """The largest |input| in real units an exact DReLU of ``ring_bits`` bits decides
    correctly: 2^(ℓ−1−f) (the lower end −2^(ℓ−1) units is exact too)."""
    return 2.0 ** (int(ring_bits) - 1 - int(frac_bits))


def _finite(value: Any, what: str, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalibrationError(f"{what} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo:
        raise CalibrationError(f"{what} must be finite and >= {lo}, got {value!r}")
    return v


@dataclass(frozen=True)
class Calibration:
    """What calibration recorded (public, travels with the spec file).

    ``ranges``: compiled DReLU layer name → the largest |input| of its comparisons on the
    calibration images (real units); ``margin``: the safety factor the widths use unless a
    caller overrides it; ``images``: how many calibration images; ``frac_bits``: the fixed point
    the headroom was checked at; ``max_activation``: the largest |value| of any layer;
    ``headroom``: how many times the largest ring value (a product of two encodings, about
    2^(2f) times the real value) fits below 2^63; ``truncation_failures``: the expected number
    of catastrophic local-truncation failures per image at ``frac_bits`` (each puts an error
    near 2^(64−2f) into one value; see :func:`secure_inference.mpc.compile.truncation_failures`).
    ``drops`` (opt-in, :mod:`secure_inference.mpc.dropped_bits`): ReLU layer name → low bits
    its comparison drops at ``frac_bits``, chosen within ``drop_budget`` (the expected output
    error as a fraction of the layer's output L1 norm on the calibration images).
    """

    ranges: Mapping[str, float]
    margin: float = DEFAULT_MARGIN
    images: int = 0
    frac_bits: int = 16
    max_activation: float = 0.0
    headroom: float = float("inf")
    truncation_failures: float = 0.0
    drops: Mapping[str, int] = field(default_factory=dict)
    drop_budget: float = 0.0

    def drop(self, layer: str, frac_bits: int) -> int:
        """Low bits ``layer`` drops when the parties run ``frac_bits`` fractional bits: the
        same threshold in real units as at calibration (2^(d−f)), so d moves with f; 0 for a
        layer without a recorded drop."""
        d = int(self.drops.get(layer, 0))
        return max(0, d + int(frac_bits) - int(self.frac_bits)) if d else 0

    def width(self, layer: str, frac_bits: int, margin: float | None = None) -> int:
        """The comparison width of ``layer`` (64 when it has no recorded range)."""
        if layer not in self.ranges:
            return FULL_WIDTH
        return comparison_width(float(self.ranges[layer]), frac_bits,
                                self.margin if margin is None else margin)

    def widths(self, frac_bits: int, margin: float | None = None) -> dict[str, int]:
        """Width of every calibrated layer."""
        return {name: self.width(name, frac_bits, margin) for name in self.ranges}

    def to_plain(self) -> dict[str, Any]:
        """Plain types only (str, float, int, dict): what the spec file stores (the drop keys
        only when bits are dropped, so that files without them are unchanged)."""
        plain = {"version": 1, "ranges": {str(k): float(v) for k, v in self.ranges.items()},
                 "margin": float(self.margin), "images": int(self.images),
                 "frac_bits": int(self.frac_bits), "max_activation": float(self.max_activation),
                 "headroom": float(min(self.headroom, 1e300)),
                 "truncation_failures": float(self.truncation_failures)}
        drops = {str(k): int(v) for k, v in self.drops.items() if int(v)}
        if drops:
            plain["drops"] = drops
            plain["drop_budget"] = float(self.drop_budget)
        return plain

    @classmethod
    def from_plain(cls, obj: Any, source: str = "spec") -> "Calibration":
        """Inverse of :meth:`to_plain`, checking every field (files are untrusted)."""
        where = f"{source}: {CALIBRATION_KEY}"
        if not isinstance(obj, dict):
            raise CalibrationError(f"{where} must be a dict, got {type(obj).__name__}")
        if obj.get("version") != 1:
            raise CalibrationError(f"{where}: unknown version {obj.get('version')!r} (this "
                                   "release reads version 1; recalibrate with si-calibrate)")
        ranges = obj.get("ranges")
        if not isinstance(ranges, dict):
            raise CalibrationError(f"{where}: 'ranges' must be a dict of layer name -> number")
        if len(ranges) > MAX_CALIBRATED_LAYERS:
            raise CalibrationError(f"{where}: {len(ranges)} ranges, more than the limit of "
                                   f"{MAX_CALIBRATED_LAYERS} layers")
        clean: dict[str, float] = {}
        for name, value in ranges.items():
            if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
                raise CalibrationError(f"{where}: layer names must be non-empty strings of at "
                                       f"most {_MAX_NAME} characters, got {name!r:.80}")
            clean[name] = _finite(value, f"{where}: range of layer '{name}'")
        frac = obj.get("frac_bits")
        if isinstance(frac, bool) or not isinstance(frac, int) or not 0 <= frac <= 31:
            raise CalibrationError(f"{where}: frac_bits must be an integer in [0, 31]")
        images = obj.get("images")
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise CalibrationError(f"{where}: images must be an integer >= 0")
        margin = _finite(obj.get("margin"), f"{where}: margin", 1.0)
        drops = _drops(obj.get("drops", {}), clean, where)
        return cls(ranges=clean, margin=margin, images=images, frac_bits=frac,
                   drops=drops, drop_budget=_finite(obj.get("drop_budget", 0.0),
                                                    f"{where}: drop_budget"),
                   max_activation=_finite(obj.get("max_activation", 0.0),
                                          f"{where}: max_activation"),
                   headroom=_finite(obj.get("headroom", 1e300), f"{where}: headroom"),
                   truncation_failures=_finite(obj.get("truncation_failures", 0.0),
                                               f"{where}: truncation_failures"))


def _drops(obj: Any, ranges: Mapping[str, float], where: str) -> dict[str, int]:
    """The checked ``drops`` field: calibrated layer name → an int in [0, 61]."""
    if not isinstance(obj, dict):
        raise CalibrationError(f"{where}: 'drops' must be a dict of layer name -> int")
    clean: dict[str, int] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or name not in ranges:
            raise CalibrationError(f"{where}: 'drops' names {name!r:.80}, which has no range")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 61:
            raise CalibrationError(f"{where}: dropped bits of layer '{name}' must be an "
                                   f"integer in [0, 61], got {value!r:.80}")
        clean[name] = value
    return clean
