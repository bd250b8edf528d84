"""From per-channel distortion results to a block spec: budgets, the knapsack, reports.

The knapsack step of the pipeline: read a distortion folder
(:func:`secure_inference.distortion.store.load_results`), check it (and optionally the model's
sites), solve one multiple-choice knapsack over all channels of all sites for a budget of
DReLUs or of bytes on the wire (``cost="bytes"``, priced by :mod:`.costs`), and turn the chosen
options into a block spec ``{site: int32 [C, 2]}``.
"""
from __future__ import annotations

import csv
import io
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..brelu import block_costs
from ..distortion.store import DistortionFileError, SiteDistortion
from ..sites import ReluSite
from ..wire_costs import FULL_WIDTH
from .costs import (COSTS, UNITS_PER_BYTE, all_relu_bytes, byte_budget_units, option_units,
                    spec_site_bytes)
from .mckp import FlatInstance, MCKPResult, solve_mckp

__all__ = ["KnapsackSolution", "all_relu_count", "budget_from_ratio", "check_distortion_results",
           "check_against_sites", "knapsack_block_spec", "site_table", "site_table_csv",
           "site_table_markdown", "plot_site_drelus", "plot_site_bytes"]


@dataclass
class KnapsackSolution:
    """A block spec chosen by the knapsack, with the solver's result and timing.

    ``budget`` is in the unit of ``cost``: DReLUs per image (``"drelus"``) or bytes per image
    (``"bytes"``). ``drelus`` and ``bytes`` are the chosen spec's DReLUs and exact bytes per
    image of the recorded sites (bytes at ``widths``, 64 bits where a site has none), next to
    the all-ReLU ``total_relus`` and ``total_bytes``. ``result`` is the solver's own: in DReLUs,
    or for ``"bytes"`` in units of 1/:data:`~.costs.UNITS_PER_BYTE` byte of the linear price
    (see :mod:`.costs`) under ``result.budget`` = the byte budget less the packing reserve.
    """

    spec: dict[str, np.ndarray]
    result: MCKPResult
    budget: int
    total_relus: int
    seconds: float
    cost: str = "drelus"
    drelus: int = 0
    bytes: int = 0
    total_bytes: int = 0
    widths: dict[str, int] = field(default_factory=dict)


def all_relu_count(results: Mapping[str, SiteDistortion]) -> int:
    """DReLUs of the recorded sites with every channel its original activation (C·H·W
    summed; twice that at a ReLU6 site)."""
    return int(sum(r.drelus_per_patch * r.channels * r.height * r.width
                   for r in results.values()))


def budget_from_ratio(ratio: float, total_relus: int, what: str = "DReLU count") -> int:
    """``floor(ratio × total_relus)``; ``ratio`` must lie in (0, 1]. The total may be any
    all-ReLU count (``what`` names it in the error): DReLUs, or bytes per image."""
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1] (a share of the all-ReLU {what}), "
                         f"got {ratio}")
    return int(math.floor(ratio * total_relus + 1e-9))


def check_distortion_results(results: Mapping[str, SiteDistortion]) -> None:
    """Raise :class:`DistortionFileError` for results the knapsack cannot use: no sites,
    empty sites, NaN/inf, or costs that disagree with the block sizes and map size."""
    if not results:
        raise DistortionFileError("the distortion folder lists no sites")
    for name, r in results.items():
        r.check()
        if r.channels < 1 or len(r.block_sizes) < 1:
            raise DistortionFileError(f"site '{name}': {r.channels} channels and "
                                      f"{len(r.block_sizes)} candidate sizes; need at least one "
                                      "of each")
        expected = r.drelus_per_patch * block_costs(r.block_sizes, r.height, r.width)
        if not np.array_equal(expected, r.costs):
            k = int(np.flatnonzero(expected != r.costs)[0])
            raise DistortionFileError(
                f"site '{name}': candidate {r.block_sizes[k].tolist()} is recorded with cost "
                f"{int(r.costs[k])} but costs {int(expected[k])} DReLUs on a "
                f"{r.height}x{r.width} map ({r.activation} site); the file is inconsistent, "
                "recollect it")


def check_against_sites(results: Mapping[str, SiteDistortion], sites: Sequence[ReluSite]) -> None:
    """Raise :class:`DistortionFileError` unless the recorded sites are exactly the model's
    sites with the same channels and map sizes."""
    by_name = {s.name: s for s in sites}
    unknown = [n for n in results if n not in by_name]
    if unknown:
        raise DistortionFileError(
            f"{len(unknown)} recorded sites are not sites of the model: {unknown[:5]}; "
            f"the model's sites are e.g. {list(by_name)[:5]} (wrong model or config?)")
    missing = [n for n in by_name if n not in results]
    if missing:
        raise DistortionFileError(
            f"the distortion folder has no results for {len(missing)} sites of the model: "
            f"{missing[:5]}; collect them first (otherwise they stay all-ReLU and the budget "
            "cannot be met)")
    for name, r in results.items():
        s = by_name[name]
        if s.activation != r.activation:
            raise DistortionFileError(
                f"site '{name}': recorded as a {r.activation} site but the model's is "
                f"{s.activation} (was the model converted, e.g. relu6_to_relu, after the "
                "distortion was measured?)")
        if (s.channels, s.height, s.width) != (r.channels, r.height, r.width):
            raise DistortionFileError(
                f"site '{name}': recorded as {r.channels}x{r.height}x{r.width} (C×H×W) but the "
                f"model gives {s.channels}x{s.height}x{s.width} at this input size")


def _instance(results: Mapping[str, SiteDistortion], cost: str = "drelus",
              widths: Mapping[str, int] | None = None
              ) -> tuple[FlatInstance, list[tuple[str, int, int]]]:
    """All channels of all sites as one flat instance (costs in DReLUs, or in byte units at
    ``widths``); returns it with (site, first, K) spans."""
    costs, dists, lengths, spans = [], [], [], []
    first = 0
    for name, r in results.items():
        k = len(r.costs)
        price = (r.costs.astype(np.int64) if cost == "drelus" else
                 option_units(r, int((widths or {}).get(name, FULL_WIDTH))))
        costs.append(np.tile(price, r.channels))
        dists.append(np.ascontiguousarray(r.distortion, dtype=np.float64).reshape(-1))
        lengths.append(np.full(r.channels, k, dtype=np.int64))
        spans.append((name, first, k))
        first += r.channels
    offsets = np.zeros(first + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return FlatInstance(np.concatenate(costs), np.concatenate(dists), offsets), spans


def knapsack_block_spec(results: Mapping[str, SiteDistortion], budget: int, *,
                        cost: str = "drelus", widths: Mapping[str, int] | None = None,
                        **solver_options) -> KnapsackSolution:
    """Choose one candidate size per channel of every site, minimising the summed distortion
    with total cost <= ``budget``; returns the spec and the solver's result.

    ``cost="drelus"`` (default): ``budget`` is DReLUs per image. ``cost="bytes"``: ``budget``
    is bytes per image that the runtime sends for these sites, every option priced at its
    site's comparison width ``widths[site]`` (default 64; see :mod:`.costs`); the exact bytes
    of the returned spec never exceed ``budget``. Both report DReLUs and exact bytes.

    Raises ``InfeasibleBudgetError`` when even the cheapest candidates exceed the budget.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    check_distortion_results(results)
    widths = {name: int((widths or {}).get(name, FULL_WIDTH)) for name in results}
    inst, spans = _instance(results, cost, widths)
    if cost == "drelus":
        solver_budget = int(budget)
    else:
        if isinstance(budget, (bool, np.bool_)) or not float(budget).is_integer() or budget < 0:
            raise ValueError(f"a byte budget must be a whole number >= 0, got {budget!r}")
        solver_budget = byte_budget_units(int(budget), len(results))
    t0 = time.perf_counter()
    res = solve_mckp(inst, None, solver_budget, **solver_options)
    seconds = time.perf_counter() - t0
    spec: dict[str, np.ndarray] = {}
    for name, first, _k in spans:
        r = results[name]
        picks = res.choice[first:first + r.channels]
        spec[name] = r.block_sizes[picks].astype(np.int32)
    drelus = int(sum(r.drelus_per_patch * int(block_costs(spec[n], r.height, r.width).sum())
                     for n, r in results.items()))
    exact = int(sum(spec_site_bytes(results, spec, widths).values()))
    if cost == "bytes" and exact > int(budget):   # cannot happen: the reserve covers rounding
        raise RuntimeError(f"exact bytes {exact} exceed the budget {budget} "
                             f"(linear price {res.total_cost / UNITS_PER_BYTE} bytes)")
    return KnapsackSolution(spec, res, int(budget), all_relu_count(results), seconds,
                            cost=cost, drelus=drelus, bytes=exact,
                            total_bytes=all_relu_bytes(results, widths), widths=widths)


def _size_label(hw) -> str:
    h, w = int(hw[0]), int(hw[1])
    return "identity" if h == 0 or w == 0 else f"{h}x{w}"


def site_table(results: Mapping[str, SiteDistortion], spec: Mapping[str, np.ndarray],
               top: int = 3, widths: Mapping[str, int] | None = None) -> list[dict]:
    """One row per site: DReLUs and exact bytes per image before (all ReLU) and after, the
    comparison width that prices the bytes (``widths``, default 64), identity share, common
    sizes."""
    rows = []
    before_bytes = spec_site_bytes(results, {}, widths)
    after_bytes = spec_site_bytes(results, spec, widths)
    for name, r in results.items():
        sizes = np.asarray(spec[name])
        before = r.drelus_per_patch * r.channels * r.height * r.width
        after = r.drelus_per_patch * int(block_costs(sizes, r.height, r.width).sum())
        labels = Counter(_size_label(hw) for hw in sizes)
        common = ", ".join(f"{lab}:{cnt}" for lab, cnt in labels.most_common(top))
        rows.append(dict(site=name, channels=r.channels, height=r.height, width=r.width,
                         drelus_before=before, drelus_after=after,
                         kept_share=after / before if before else 0.0,
                         identity_share=labels.get("identity", 0) / r.channels,
                         common_sizes=common,
                         drelu_width=int((widths or {}).get(name, FULL_WIDTH)),
                         bytes_before=before_bytes[name], bytes_after=after_bytes[name]))
    return rows


def site_table_csv(rows: Sequence[dict]) -> str:
    """The rows of :func:`site_table` as CSV text."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def site_table_markdown(rows: Sequence[dict]) -> str:
    """The rows of :func:`site_table` as a markdown table with a total line."""
    head = ("| site | C | H×W | DReLUs before | DReLUs after | kept | ℓ | bytes before | "
            "bytes after | identity ch. | most common sizes |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = [f"| {r['site']} | {r['channels']} | {r['height']}×{r['width']} | "
             f"{r['drelus_before']:,} | {r['drelus_after']:,} | {100 * r['kept_share']:.2f}% | "
             f"{r['drelu_width']} | {r['bytes_before']:,} | {r['bytes_after']:,} | "
             f"{100 * r['identity_share']:.1f}% | {r['common_sizes']} |" for r in rows]
    before = sum(r["drelus_before"] for r in rows)
    after = sum(r["drelus_after"] for r in rows)
    b_before = sum(r["bytes_before"] for r in rows)
    b_after = sum(r["bytes_after"] for r in rows)
    lines.append(f"| **total** | {sum(r['channels'] for r in rows)} | | {before:,} | {after:,} | "
                 f"{100 * after / max(before, 1):.2f}% | | {b_before:,} | {b_after:,} "
                 f"({100 * b_after / max(b_before, 1):.2f}%) | | |")
    notes = ("\nBytes: exact payload bytes per image that the secure runtime sends for each "
             "site's fused DReLU layer at comparison width ℓ (all parties; the DReLUs plus 24 "
             "bytes per non-identity pixel, both twice at a ReLU6 site; identity channels are "
             "free).\n")
    return head + "\n".join(lines) + "\n" + notes


def _plot_sites(rows: Sequence[dict], path: str | Path, title: str, key: str, scale: float,
                ylabel: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.25 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(x, [r[f"{key}_before"] / scale for r in rows], color="#cccccc", label="all ReLU")
    ax.bar(x, [max(r[f"{key}_after"], 0) / scale for r in rows], color="#1f77b4",
           label="chosen")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(x)
    ax.set_xticklabels([r["site"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_site_drelus(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Bar plot (PNG) of DReLUs per site before and after, log scale, forward order."""
    _plot_sites(rows, path, title, "drelus", 1.0, "DReLUs per image")


def plot_site_bytes(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Bar plot (PNG) of the exact bytes per site (KB per image) before and after, log scale,
    forward order."""
    _plot_sites(rows, path, title, "bytes", 1e3, "KB per image (secure runtime)")
