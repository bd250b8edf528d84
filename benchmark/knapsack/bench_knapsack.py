"""Knapsack benchmark: the exact hull+core MCKP solver against the cost-indexed DP (the original
research method) and scipy's HiGHS MILP, on ResNet-shaped synthetic instances.

Instances use the real activation-site shapes (torchvision ResNet50 at 224×224: 49 sites,
22,720 channels; mmpretrain ResNet18-CIFAR at 32×32: 17 sites, 3,904 channels), the project's
candidate block sizes per site, and synthetic distortions that decrease with cost plus noise
(see :func:`synthetic_distortion`). Each method runs in its own subprocess so that its peak
resident memory (``ru_maxrss``) is its own; the solver's own allocations are measured with
tracemalloc.

    .venv/bin/python benchmark/knapsack/bench_knapsack.py            # everything (~5 min)
    .venv/bin/python benchmark/knapsack/bench_knapsack.py --quick    # skip HiGHS on ResNet50
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# --------------------------------------------------------------------------- instances

def site_shapes(name: str) -> list[tuple[str, int, int, int]]:
    """(site, C, H, W) of the real model at its usual input size."""
    import secure_inference as si
    from secure_inference.models import load_model
    if name == "resnet50":
        model, shape = load_model("resnet50"), (3, 224, 224)
    elif name == "resnet18_cifar":
        import mmpretrain.models  # noqa: F401  (registers the models)
        from mmpretrain.registry import MODELS
        model = MODELS.build(dict(
            type="ImageClassifier",
            backbone=dict(type="ResNet_CIFAR", depth=18, num_stages=4, out_indices=(3,)),
            neck=dict(type="GlobalAveragePooling"),
            head=dict(type="LinearClsHead", num_classes=100, in_channels=512)))
        shape = (3, 32, 32)
    else:
        raise ValueError(name)
    return [(s.name, s.channels, s.height, s.width) for s in si.find_relu_sites(model, shape)]


def synthetic_distortion(rng: np.random.Generator, sizes: np.ndarray, costs: np.ndarray,
                         channels: int, site_scale: float) -> np.ndarray:
    """Distortion [C, K]: 0 for [1, 1]; grows with the share of DReLUs removed, per-channel
    scale and curvature, non-square patches a little worse, multiplicative noise."""
    full = costs.max()
    removed = 1.0 - costs / full                                   # 0 for [1,1], 1 for identity
    scale = site_scale * rng.lognormal(0.0, 1.0, size=(channels, 1))
    power = rng.uniform(0.4, 2.0, size=(channels, 1))
    h, w = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
    aspect = np.where((h > 0) & (w > 0), 1 + 0.1 * np.abs(np.log(np.maximum(h, 1) / np.maximum(w, 1))), 1.0)
    ident = (h == 0) | (w == 0)
    id_factor = np.where(ident, rng.lognormal(0.3, 0.5, size=(channels, 1)), 1.0)
    noise = rng.lognormal(0.0, 0.25, size=(channels, sizes.shape[0]))
    d = scale * removed[None, :] ** power * aspect[None, :] * id_factor * noise
    d[:, removed == 0] = 0.0
    return d


def build_instance(name: str, seed: int, max_rect: int) -> dict:
    import secure_inference as si
    rng = np.random.default_rng(seed)
    costs, dists, offsets = [], [], [0]
    total_relus = 0
    shapes = site_shapes(name)
    for idx, (site, c, h, w) in enumerate(shapes):
        sizes = si.candidate_block_sizes(h, w, max_rect=max_rect)
        cost = si.candidate_costs(sizes, h, w)
        d = synthetic_distortion(rng, sizes, cost, c, site_scale=float(rng.lognormal(0, 0.7)))
        costs.append(np.tile(cost, c))
        dists.append(d.reshape(-1))
        offsets.extend(offsets[-1] + cost.size * np.arange(1, c + 1))
        total_relus += c * h * w
    return dict(costs=np.concatenate(costs), dists=np.concatenate(dists),
                offsets=np.asarray(offsets, dtype=np.int64), total_relus=total_relus,
                sites=len(shapes), channels=len(offsets) - 1,
                max_options=int(np.diff(offsets).max()))


# --------------------------------------------------------------------------- workers

def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, path: str, budget: int, time_limit: float) -> dict:
    import tracemalloc
    from secure_inference.knapsack import FlatInstance, dp_mckp, solve_mckp
    z = np.load(path, allow_pickle=False)
    inst = FlatInstance(z["costs"], z["dists"], z["offsets"])
    rss_before = _rss_mib()
    out: dict = {"method": method}
    if method == "solver":
        small = FlatInstance(inst.costs[:inst.offsets[3]], inst.distortions[:inst.offsets[3]],
                             inst.offsets[:4])
        t0 = time.perf_counter()
        solve_mckp(small, None, int(inst.costs[:inst.offsets[3]].max()))  # numba compile / cache load
        out["warmup_s"] = time.perf_counter() - t0
        tracemalloc.start()
        t0 = time.perf_counter()
        r = solve_mckp(inst, None, budget)
        out["time_s"] = time.perf_counter() - t0
        out["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out.update(distortion=r.total_distortion, cost=r.total_cost, gap=r.gap,
                   lower_bound=r.lower_bound, lp_bound=r.lp_bound, optimal=r.optimal,
                   core_channels=r.core_channels, dp_states=r.dp_states,
                   greedy_distortion=r.stats.get("greedy_distortion"))
    elif method == "dp":
        from secure_inference.knapsack.reference import dp_table_bytes
        t0 = time.perf_counter()
        r = dp_mckp(inst, None, budget)
        out["time_s"] = time.perf_counter() - t0
        out.update(distortion=r.total_distortion, cost=r.total_cost, gap=0.0,
                   table_mib=dp_table_bytes(inst.num_channels, budget,
                                            int(np.diff(inst.offsets).max())) / 2**20)
    elif method == "sweep":
        # robustness: other budgets, and distortions rounded to few distinct values (many ties)
        rows = []
        solve_mckp(inst, None, budget)  # warm-up
        total = int(budget / 0.06)
        for variant in ("noisy", "ties"):
            d = inst.distortions if variant == "noisy" else np.round(inst.distortions * 2) / 2
            f = FlatInstance(inst.costs, d, inst.offsets)
            for ratio in (0.01, 0.03, 0.06, 0.09, 0.2, 0.5):
                t0 = time.perf_counter()
                r = solve_mckp(f, None, int(ratio * total))
                rows.append(dict(variant=variant, ratio=ratio, time_s=time.perf_counter() - t0,
                                 gap=r.gap, optimal=r.optimal, core_channels=r.core_channels,
                                 dp_states=r.dp_states))
        out["sweep"] = rows
    elif method == "highs":
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_matrix
        n, m = inst.num_channels, inst.costs.size
        rows = np.repeat(np.arange(n), np.diff(inst.offsets))
        a_eq = csr_matrix((np.ones(m), (rows, np.arange(m))), shape=(n, m))
        a_cost = csr_matrix(inst.costs.astype(float)[None, :])
        t0 = time.perf_counter()
        res = milp(inst.distortions, integrality=np.ones(m), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(a_eq, 1, 1), LinearConstraint(a_cost, -np.inf, budget)],
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "disp": False})
        out["time_s"] = time.perf_counter() - t0
        out["status"] = int(res.status)
        out["message"] = str(res.message)
        if res.x is not None:
            x = np.round(res.x).astype(bool)
            out.update(distortion=float(inst.distortions[x].sum()), cost=int(inst.costs[x].sum()),
                       gap=float(getattr(res, "mip_gap", np.nan)),
                       dual_bound=float(getattr(res, "mip_dual_bound", np.nan)))
    out["rss_before_mib"] = rss_before
    out["peak_rss_mib"] = _rss_mib()
    return out


def run_worker(method: str, path: str, budget: int, time_limit: float = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, path, str(budget), str(time_limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "NPZ", "BUDGET", "TIME_LIMIT"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--ratio", type=float, default=0.06)
    ap.add_argument("--seed", type=int, default=0, help="synthetic distortion seed")
    ap.add_argument("--max-rect", type=int, default=6,
                    help="candidate rectangles up to this side (6: up to 54 options per channel)")
    ap.add_argument("--highs-time-limit", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="skip HiGHS on the ResNet50 instance")
    ap.add_argument("--json", type=Path, help="also write all results here")
    args = ap.parse_args(argv)
    if args.worker:
        method, path, budget, tl = args.worker
        print(json.dumps(worker(method, path, int(budget), float(tl))))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"load average at start: {os.getloadavg()}", flush=True)
        for name in ("resnet18_cifar", "resnet50"):
            inst = build_instance(name, args.seed, args.max_rect)
            budget = int(args.ratio * inst["total_relus"])
            path = os.path.join(tmp, f"{name}.npz")
            np.savez(path, costs=inst["costs"], dists=inst["dists"], offsets=inst["offsets"])
            info = {k: inst[k] for k in ("total_relus", "sites", "channels", "max_options")}
            info.update(options=int(inst["costs"].size), budget=budget)
            print(f"\n== {name}: {info}", flush=True)
            runs = {"solver": run_worker("solver", path, budget)}
            print(runs["solver"], flush=True)
            if name == "resnet18_cifar":
                runs["dp"] = run_worker("dp", path, budget)
                print(runs["dp"], flush=True)
            if name == "resnet18_cifar" or not args.quick:
                runs["highs"] = run_worker("highs", path, budget, args.highs_time_limit)
                print(runs["highs"], flush=True)
            if name == "resnet50":
                runs["sweep"] = run_worker("sweep", path, budget)
                for row in runs["sweep"].get("sweep", []):
                    print(row, flush=True)
                from secure_inference.knapsack.reference import dp_table_bytes
                info["dp_table_gib"] = dp_table_bytes(info["channels"], budget,
                                                      info["max_options"]) / 2**30
            results[name] = {"instance": info, "runs": runs}
        print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
