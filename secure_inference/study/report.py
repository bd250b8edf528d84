"""The study's table and plots from its results file: accuracy against DReLUs per image and
against exact bytes per image (the DReLU layers' bytes on the wire at the study's
``bytes_width``; runs recorded before bytes were recorded show '-' and are left out of the
bytes plot)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .methods import METHODS


def _run_bytes(run: Mapping[str, Any], data: Mapping[str, Any]) -> int | None:
    """A run's bytes per image: its own record, else its spec's (same spec, same bytes),
    else None (a results file from before bytes were recorded)."""
    if run.get("bytes") is not None:
        return int(run["bytes"])
    method = "knapsack" if run["method"] == "knapsack_kd" else run["method"]
    spec = (data.get("specs") or {}).get(f"{method}@{run['budget']}") or {}
    return None if spec.get("bytes") is None else int(spec["bytes"])


def aggregate(data: Mapping[str, Any]) -> list[dict]:
    """One row per (budget, method) with finished runs: DReLUs, bytes per image (None where a
    run has none recorded), seeds, per-seed accuracies, mean and std accuracy (sample standard
    deviation over seeds; 0 for one seed), sorted by budget then method."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in data.get("runs", {}).values():
        groups[(run["budget"], run["method"])].append(run)
    budgets = data.get("budgets", {})
    order = {m: i for i, m in enumerate(METHODS)}
    base = (data.get("baseline") or {}).get("drelus") or 0
    rows = []
    for (budget, method), runs in groups.items():
        acc = np.array([r["accuracy"] for r in runs], dtype=float)
        drelus = int(round(np.mean([r["drelus"] for r in runs])))
        per_run = [_run_bytes(r, data) for r in runs]
        nbytes = (int(round(np.mean(per_run))) if per_run and None not in per_run else None)
        runs = sorted(runs, key=lambda r: r["seed"])
        rows.append({"budget": budget, "method": method,
                     "budget_drelus": budgets.get(budget, {}).get("drelus",
                                                                  runs[0]["budget_drelus"]),
                     "drelus": drelus, "share": drelus / base if base else math.nan,
                     "bytes": nbytes, "accuracies": [float(r["accuracy"]) for r in runs],
                     "seeds": [r["seed"] for r in runs], "n": len(runs),
                     "mean": float(acc.mean()),
                     "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0})
    rows.sort(key=lambda r: (-r["budget_drelus"], order.get(r["method"], 99)))
    return rows


def gaps(rows: list[dict], reference: str = "knapsack") -> list[dict]:
    """For each budget, ``reference`` minus every other method: the accuracy gap, the seed
    spread (sum of both standard deviations) and whether the gap exceeds it (only judged when
    both sides have at least two seeds)."""
    by_budget: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_budget[r["budget"]][r["method"]] = r
    out = []
    for budget, methods in by_budget.items():
        ref = methods.get(reference)
        if ref is None:
            continue
        for name, other in methods.items():
            if name == reference:
                continue
            gap = ref["mean"] - other["mean"]
            spread = ref["std"] + other["std"]
            judged = ref["n"] > 1 and other["n"] > 1
            out.append({"budget": budget, "method": name, "gap": gap, "spread": spread,
                        "exceeds": (abs(gap) > spread) if judged else None})
    return out


def format_table(data: Mapping[str, Any]) -> str:
    """Markdown: accuracy per budget and method, then the knapsack's gaps to the others."""
    rows = aggregate(data)
    base = data.get("baseline") or {}
    lines = []
    if base:
        lines.append(f"Baseline (all ReLUs): {100 * base['accuracy']:.2f}% top-1 on "
                     f"{base.get('test_images', '?'):,} test images, "
                     f"{base['drelus']:,} DReLUs per image.\n")
    width = (data.get("settings") or {}).get("bytes_width", 64)
    lines += [f"| budget | method | DReLUs/img | % of all-ReLU | bytes/img (ℓ={width}) | "
              "seeds | top-1 accuracy (%) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        spread = f" ± {100 * r['std']:.2f}" if r["n"] > 1 else ""
        nbytes = "-" if r["bytes"] is None else f"{r['bytes']:,}"
        lines.append(f"| {r['budget']} ({r['budget_drelus']:,}) | {r['method']} | "
                     f"{r['drelus']:,} | {100 * r['share']:.2f} | {nbytes} | {r['n']} | "
                     f"{100 * r['mean']:.2f}{spread} |")
    g = gaps(rows)
    if g:
        lines += ["", "Knapsack minus each other method (points of accuracy); *exceeds* means "
                  "|gap| > std(knapsack) + std(other), judged where both have ≥ 2 seeds:", "",
                  "| budget | vs method | gap | seed spread | exceeds |", "|---|---|---:|---:|---|"]
        for x in g:
            verdict = {True: "yes", False: "no", None: "n/a (1 seed)"}[x["exceeds"]]
            lines.append(f"| {x['budget']} | {x['method']} | {100 * x['gap']:+.2f} | "
                         f"{100 * x['spread']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(data: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG: accuracy against DReLUs per image (log x), one line per method, error bars = std
    over seeds, the baseline as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = aggregate(data)
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["drelus"])
        ax.errorbar([r["drelus"] for r in pts], [100 * r["mean"] for r in pts],
                    yerr=[100 * r["std"] for r in pts], marker="o", capsize=3, label=method)
    base = data.get("baseline")
    if base:
        ax.axhline(100 * base["accuracy"], color="grey", linestyle="--",
                   label=f"all ReLUs ({base['drelus']:,} DReLUs)")
    ax.set_xscale("log")
    ax.set_xlabel("DReLUs per image (log scale)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title or "Accuracy against DReLU budget (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_bytes(data: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG: accuracy against exact bytes per image (MB, linear x), one marker set per method:
    every seed as a small marker, the mean ± std over seeds as a larger one joined across
    budgets; the baseline as a dashed line. Rows without recorded bytes are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in aggregate(data) if r["bytes"] is not None]
    width = (data.get("settings") or {}).get("bytes_width", 64)
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "os^Dvx<>P*"
    for i, method in enumerate([m for m in METHODS if any(r["method"] == m for r in rows)]):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes"])
        xs = [r["bytes"] / 1e6 for r in pts]
        line = ax.errorbar(xs, [100 * r["mean"] for r in pts],
                           yerr=[100 * r["std"] for r in pts], marker=markers[i % 10],
                           capsize=3, label=f"{method} (mean ± std)")
        color = line[0].get_color()
        for x, r in zip(xs, pts):
            ax.scatter([x] * r["n"], [100 * a for a in r["accuracies"]], s=12, alpha=0.5,
                       color=color, marker=markers[i % 10])
    base = data.get("baseline")
    if base:
        extra = f", {base['bytes'] / 1e6:.2f} MB" if base.get("bytes") else ""
        ax.axhline(100 * base["accuracy"], color="grey", linestyle="--",
                   label=f"all ReLUs{extra}")
    ax.set_xlabel(f"bytes per image of the DReLU layers (MB, ℓ = {width} bits)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title or "Accuracy against bytes per image (every seed; mean ± std)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out and write a figure as PNG (creating its folder)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
