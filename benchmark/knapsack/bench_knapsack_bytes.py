"""Knapsack on bytes: solver time and what pricing by bytes changes, on the instances of
bench_knapsack.py (real ResNet18-CIFAR / ResNet50-ImageNet site shapes, the same synthetic
distortions, seed 0).

For each instance: the DReLU knapsack at 6% of the all-ReLU DReLUs; the bytes knapsack at 6% of
the all-ReLU bytes (64-bit and 27-bit comparisons); and the bytes knapsack at exactly the bytes
the DReLU knapsack's 6% spec sends (64 bits), to compare the summed distortion at equal bytes.
Times are the median of three solves (``KnapsackSolution.seconds``, the solver only).

    .venv/bin/python benchmark/knapsack/bench_knapsack_bytes.py [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_knapsack", HERE / "bench_knapsack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_results(name: str, seed: int = 0, max_rect: int = 6) -> dict:
    """SiteDistortion per site with bench_knapsack's synthetic distortions (same draws)."""
    import secure_inference as si
    from secure_inference.distortion.store import SiteDistortion
    bench = _bench_module()
    rng = np.random.default_rng(seed)
    results = {}
    for site, c, h, w in bench.site_shapes(name):
        sizes = si.candidate_block_sizes(h, w, max_rect=max_rect)
        cost = si.candidate_costs(sizes, h, w)
        d = bench.synthetic_distortion(rng, sizes, cost, c, site_scale=float(rng.lognormal(0, 0.7)))
        results[site] = SiteDistortion(site, d, sizes, cost, c, h, w, 1, seed)
    return results


def solve(results, budget, cost, widths, repeats=3):
    from secure_inference.knapsack import knapsack_block_spec
    sols = [knapsack_block_spec(results, budget, cost=cost, widths=widths) for _ in range(repeats)]
    sol = sols[-1]
    r = sol.result
    return dict(cost=cost, width=sorted(set(widths.values())), budget=int(budget),
                seconds=statistics.median(s.seconds for s in sols), drelus=sol.drelus,
                bytes=sol.bytes, all_relu_bytes=sol.total_bytes,
                distortion=r.total_distortion, gap=r.gap, optimal=r.optimal,
                core_channels=r.core_channels, dp_states=r.dp_states)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.06)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from secure_inference.knapsack import (all_relu_bytes, all_relu_count, budget_from_ratio,
                                           site_widths, solve_mckp)
    solve_mckp([[0, 1], [0, 1]], [[1.0, 0.0], [1.0, 0.0]], 1)   # numba compile outside timings
    out = {}
    for name in ("resnet18_cifar", "resnet50"):
        results = build_results(name)
        rows = []
        w64 = site_widths(results)
        rows.append(solve(results, budget_from_ratio(args.ratio, all_relu_count(results)),
                          "drelus", w64))
        for ell in (64, 27):
            w = site_widths(results, drelu_width=ell)
            rows.append(solve(results, budget_from_ratio(args.ratio, all_relu_bytes(results, w)),
                              "bytes", w))
        rows.append(solve(results, rows[0]["bytes"], "bytes", w64))   # equal bytes
        rows[-1]["note"] = "bytes budget = bytes of the DReLU knapsack's spec"
        out[name] = rows
        for r in rows:
            print(f"{name:15s} {r['cost']:6s} ℓ={r['width']} budget {r['budget']:>13,}: "
                  f"{r['seconds']:.2f} s, DReLUs {r['drelus']:>9,}, bytes {r['bytes']:>13,}, "
                  f"distortion {r['distortion']:.6f}, gap {r['gap']:.2g}, core "
                  f"{r['core_channels']}, states {r['dp_states']:,} {r.get('note', '')}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
