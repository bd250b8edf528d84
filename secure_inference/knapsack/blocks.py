"""From per-channel distortion results to a block spec: budgets, the knapsack, reports.

The knapsack step of the pipeline: read a distortion folder
(:func:`secure_inference.distortion.store.load_results`), check it (and optionally the model's
sites), solve one multiple-choice knapsack over all channels of all sites for a DReLU budget,
and turn the chosen options into a block spec ``{site: int32 [C, 2]}``.
"""
from __future__ import annotations

import csv
import io
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..brelu import block_costs
from ..distortion.store import DistortionFileError, SiteDistortion
from ..sites import ReluSite
from .mckp import FlatInstance, MCKPResult, solve_mckp

__all__ = ["KnapsackSolution", "all_relu_count", "budget_from_ratio", "check_distortion_results",
           "check_against_sites", "knapsack_block_spec", "site_table", "site_table_csv",
           "site_table_markdown", "plot_site_drelus"]


@dataclass
class KnapsackSolution:
    """A block spec chosen by the knapsack, with the solver's result and timing."""

    spec: dict[str, np.ndarray]
    result: MCKPResult
    budget: int
    total_relus: int
    seconds: float


def all_relu_count(results: Mapping[str, SiteDistortion]) -> int:
    """DReLUs of the recorded sites with every channel an ordinary ReLU (C·H·W summed)."""
    return int(sum(r.channels * r.height * r.width for r in results.values()))


def budget_from_ratio(ratio: float, total_relus: int) -> int:
    """``floor(ratio × total_relus)``; ``ratio`` must lie in (0, 1]."""
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1] (a share of the all-ReLU DReLU count), "
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
        expected = block_costs(r.block_sizes, r.height, r.width)
        if not np.array_equal(expected, r.costs):
            k = int(np.flatnonzero(expected != r.costs)[0])
            raise DistortionFileError(
                f"site '{name}': candidate {r.block_sizes[k].tolist()} is recorded with cost "
                f"{int(r.costs[k])} but costs {int(expected[k])} DReLUs on a "
                f"{r.height}x{r.width} map; the file is inconsistent, recollect it")


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
        if (s.channels, s.height, s.width) != (r.channels, r.height, r.width):
            raise DistortionFileError(
                f"site '{name}': recorded as {r.channels}x{r.height}x{r.width} (C×H×W) but the "
                f"model gives {s.channels}x{s.height}x{s.width} at this input size")


def _instance(results: Mapping[str, SiteDistortion]) -> tuple[FlatInstance, list[tuple[str, int, int]]]:
    """All channels of all sites as one flat instance; returns it with (site, first, K) spans."""
    costs, dists, lengths, spans = [], [], [], []
    first = 0
    for name, r in results.items():
        k = len(r.costs)
        costs.append(np.tile(r.costs.astype(np.int64), r.channels))
        dists.append(np.ascontiguousarray(r.distortion, dtype=np.float64).reshape(-1))
        lengths.append(np.full(r.channels, k, dtype=np.int64))
        spans.append((name, first, k))
        first += r.channels
    offsets = np.zeros(first + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return FlatInstance(np.concatenate(costs), np.concatenate(dists), offsets), spans


def knapsack_block_spec(results: Mapping[str, SiteDistortion], budget: int,
                        **solver_options) -> KnapsackSolution:
    """Choose one candidate size per channel of every site, total DReLUs <= ``budget``,
    minimising the summed distortion; returns the spec and the solver's result.

    Raises ``InfeasibleBudgetError`` when even the cheapest candidates exceed the budget.
    """
    check_distortion_results(results)
    inst, spans = _instance(results)
    t0 = time.perf_counter()
    res = solve_mckp(inst, None, int(budget), **solver_options)
    seconds = time.perf_counter() - t0
    spec: dict[str, np.ndarray] = {}
    for name, first, _k in spans:
        r = results[name]
        picks = res.choice[first:first + r.channels]
        spec[name] = r.block_sizes[picks].astype(np.int32)
    return KnapsackSolution(spec, res, int(budget), all_relu_count(results), seconds)


def _size_label(hw) -> str:
    h, w = int(hw[0]), int(hw[1])
    return "identity" if h == 0 or w == 0 else f"{h}x{w}"


def site_table(results: Mapping[str, SiteDistortion], spec: Mapping[str, np.ndarray],
               top: int = 3) -> list[dict]:
    """One row per site: DReLUs before (all ReLU) and after, identity share, common sizes."""
    rows = []
    for name, r in results.items():
        sizes = np.asarray(spec[name])
        before = r.channels * r.height * r.width
        after = int(block_costs(sizes, r.height, r.width).sum())
        labels = Counter(_size_label(hw) for hw in sizes)
        common = ", ".join(f"{lab}:{cnt}" for lab, cnt in labels.most_common(top))
        rows.append(dict(site=name, channels=r.channels, height=r.height, width=r.width,
                         drelus_before=before, drelus_after=after,
                         kept_share=after / before if before else 0.0,
                         identity_share=labels.get("identity", 0) / r.channels,
                         common_sizes=common))
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
    head = ("| site | C | H×W | DReLUs before | DReLUs after | kept | identity ch. | "
            "most common sizes |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = [f"| {r['site']} | {r['channels']} | {r['height']}×{r['width']} | "
             f"{r['drelus_before']:,} | {r['drelus_after']:,} | {100 * r['kept_share']:.2f}% | "
             f"{100 * r['identity_share']:.1f}% | {r['common_sizes']} |" for r in rows]
    before = sum(r["drelus_before"] for r in rows)
    after = sum(r["drelus_after"] for r in rows)
    lines.append(f"| **total** | {sum(r['channels'] for r in rows)} | | {before:,} | {after:,} | "
                 f"{100 * after / max(before, 1):.2f}% | | |")
    return head + "\n".join(lines) + "\n"


def plot_site_drelus(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Bar plot (PNG) of DReLUs per site before and after, log scale, forward order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.25 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(x, [r["drelus_before"] for r in rows], color="#cccccc", label="all ReLU")
    ax.bar(x, [max(r["drelus_after"], 0) for r in rows], color="#1f77b4", label="chosen")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(x)
    ax.set_xticklabels([r["site"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("DReLUs per image")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
