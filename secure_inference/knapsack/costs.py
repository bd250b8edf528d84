"""What a block-size option costs: DReLUs, or the exact bytes the secure runtime sends for it.

The runtime evaluates one ReLU / Block-ReLU site as ONE batched fused DReLU-multiplication over
the site's non-identity channels (:mod:`secure_inference.wire_costs`): per image it sends
``mul_drelu_bytes(decisions, pixels, ℓ)`` bytes, where ``decisions`` = Σ over the non-identity
channels of ceil(H/h)·ceil(W/w) (a [1,1] channel: H·W), ``pixels`` = H·W per non-identity
channel (every pixel of a kept or zeroed patch is multiplied by its mask) and ℓ is the site's
comparison width. An identity channel [0,1] costs nothing, and a site whose channels are all
identity has no layer at all (0 bytes). A ReLU6 site (Block-ReLU6) compares every patch twice
(m > 0, m > 6) and multiplies every pixel by both decisions, in the same one call: it sends
``mul_drelu_bytes(2·decisions, 2·pixels, ℓ)``.

The knapsack needs one additive price per channel and option. That price is the formula above
without the rounding of the Z_67 packing (five values mod 67 per 4-byte word):

    bytes(option) = k · ((12(ℓ−1)/5 + 2⌈ℓ/8⌉ + 8) · patches + 24 · H·W)     (0 for identity)

with k = 1 for a ReLU site and k = 2 for a ReLU6 site.

12(ℓ−1)/5 is not an integer, and the solver (:func:`~.mckp.solve_mckp`) takes integer costs, so
prices are counted in *fifths of a byte* (:data:`UNITS_PER_BYTE` = 5): every price is then an
exact integer, and the solver stays exact with its certified gap. The linear price of a whole
site is never above its exact bytes and at most 9.6 bytes below them (three packed messages,
each rounded up by less than one 4-byte word: 3 · 4 · 4/5 bytes); a byte budget of B bytes per
image is therefore solved as ``5B − 48·(number of sites)`` units, so the exact bytes of the
chosen spec never exceed B. Reported totals (:func:`spec_bytes`, :func:`site_bytes`) use the
exact per-layer formula, not the linear price.

Which ℓ: a uniform width (64, today's runtime default, or the width of ``--drelu-bits``), or a
calibration (:class:`~secure_inference.widths.Calibration`, from ``si-calibrate``) giving each
site the width the compiler would give its DReLU layer (layers are named by their site); sites
the calibration does not list are priced at 64 bits.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..brelu import RELU, block_costs, drelus_per_patch
from ..distortion.store import SiteDistortion
from ..widths import Calibration
from ..wire_costs import (FULL_WIDTH, OUTPUT_SHARE_BYTES, PAYLOAD_BYTES, ZP_GROUP, ZP_WORD_BYTES,
                          element_bytes, mul_drelu_bytes)

__all__ = ["COSTS", "UNITS_PER_BYTE", "PACKING_RESERVE_UNITS", "decision_units", "pixel_units",
           "site_widths", "option_units", "site_bytes", "spec_site_bytes", "spec_bytes",
           "all_relu_bytes", "byte_budget_units"]

COSTS = ("drelus", "bytes")
"""What the knapsack's budget counts: DReLUs per image, or bytes per image on the wire."""
UNITS_PER_BYTE = ZP_GROUP
"""Solver cost units per byte: with fifths of a byte the packed 4(ℓ−1)/5 bytes per message are
whole numbers."""
PACKING_RESERVE_UNITS = 3 * ZP_WORD_BYTES * (ZP_GROUP - 1)
"""Largest amount (in units, 48 = 9.6 bytes) by which one site's exact bytes exceed its linear
price: three packed messages of the DReLU, each rounded up to a whole word by < 4/5 of it."""


def decision_units(ring_bits: int = FULL_WIDTH) -> int:
    """Units (fifths of a byte) per DReLU decision at width ℓ: 5 × (12(ℓ−1)/5 + 2⌈ℓ/8⌉ + 8),
    i.e. 5 × :func:`~secure_inference.wire_costs.drelu_bytes_per_decision`."""
    return (3 * ZP_WORD_BYTES * (int(ring_bits) - 1)
            + UNITS_PER_BYTE * (2 * element_bytes(ring_bits) + OUTPUT_SHARE_BYTES))


def pixel_units() -> int:
    """Units per multiplied pixel (24 bytes: two masked 64-bit shares and one share back)."""
    return UNITS_PER_BYTE * PAYLOAD_BYTES


def site_widths(names: Iterable[str], *, drelu_width: int = FULL_WIDTH,
                calibration: Calibration | None = None, frac_bits: int = 16,
                margin: float | None = None) -> dict[str, int]:
    """The comparison width that prices each site: the calibration's width of the layer named
    after the site (64 for sites it does not list) or, without a calibration, ``drelu_width``."""
    names = list(names)
    if calibration is not None:
        return {n: int(calibration.width(n, int(frac_bits), margin)) for n in names}
    element_bytes(int(drelu_width))   # raises for a width outside [3, 64]
    return {n: int(drelu_width) for n in names}


def _width(widths: Mapping[str, int] | None, name: str) -> int:
    return FULL_WIDTH if widths is None else int(widths.get(name, FULL_WIDTH))


def option_units(r: SiteDistortion, ring_bits: int = FULL_WIDTH) -> np.ndarray:
    """Linear price (units) of each candidate of site ``r`` for one channel: int64 [K];
    identity 0, otherwise ``k · (decision_units(ℓ) · patches + pixel_units() · H·W)`` (k = 2
    for a ReLU6 site)."""
    patches = block_costs(r.block_sizes, r.height, r.width)
    units = decision_units(ring_bits) * patches + pixel_units() * (r.height * r.width)
    return np.where(patches > 0, r.drelus_per_patch * units, 0).astype(np.int64)


def site_bytes(sizes: np.ndarray, height: int, width: int, ring_bits: int = FULL_WIDTH,
               activation: str = RELU) -> int:
    """Exact bytes per image of one site with block sizes ``sizes`` [C, 2] (the runtime's one
    fused DReLU call; 0 when every channel is identity); ``activation`` 'relu6': Block-ReLU6,
    two decisions per patch and two payload values per pixel."""
    k = drelus_per_patch(activation)
    patches = block_costs(sizes, height, width)
    kept = int(np.count_nonzero(patches))
    return mul_drelu_bytes(k * int(patches.sum()), k * kept * int(height) * int(width),
                           int(ring_bits))


def spec_site_bytes(results: Mapping[str, SiteDistortion], spec: Mapping[str, np.ndarray],
                    widths: Mapping[str, int] | None = None) -> dict[str, int]:
    """Exact bytes per image of every recorded site under ``spec`` (absent sites: their
    original activation, all [1, 1])."""
    out = {}
    for name, r in results.items():
        sizes = spec[name] if name in spec else np.ones((r.channels, 2), np.int32)
        out[name] = site_bytes(np.asarray(sizes), r.height, r.width, _width(widths, name),
                               r.activation)
    return out


def spec_bytes(results: Mapping[str, SiteDistortion], spec: Mapping[str, np.ndarray],
               widths: Mapping[str, int] | None = None) -> int:
    """Exact bytes per image of the recorded sites under ``spec``, summed."""
    return int(sum(spec_site_bytes(results, spec, widths).values()))


def all_relu_bytes(results: Mapping[str, SiteDistortion],
                   widths: Mapping[str, int] | None = None) -> int:
    """Exact bytes per image of the recorded sites with every channel its original
    activation (ReLU, or ReLU6 at a ReLU6 site)."""
    return spec_bytes(results, {}, widths)


def byte_budget_units(max_bytes: int, num_sites: int) -> int:
    """The solver budget (units) that keeps the exact bytes of ``num_sites`` sites within
    ``max_bytes``: ``5·max_bytes − 48·num_sites`` (at least 0)."""
    return max(0, UNITS_PER_BYTE * int(max_bytes) - PACKING_RESERVE_UNITS * int(num_sites))
