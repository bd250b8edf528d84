"""The exact MCKP solver against the cost-indexed DP and brute force (independent references)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from secure_inference.knapsack import (FlatInstance, InfeasibleBudgetError, brute_force_mckp,
                                       dp_mckp, solve_mckp)


def rel_close(a: float, b: float, tol: float = 1e-9) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def check_against_reference(costs, dists, budget, ref=None):
    """Solver result is feasible, as good as the reference optimum, with a valid bound."""
    res = solve_mckp(costs, dists, budget)
    ref = ref or dp_mckp(costs, dists, budget)
    inst_c = costs if isinstance(costs, list) else list(costs)
    inst_d = dists if isinstance(dists, list) else list(dists)
    chosen_c = sum(int(np.asarray(c)[k]) for c, k in zip(inst_c, res.choice))
    chosen_d = math.fsum(float(np.asarray(d)[k]) for d, k in zip(inst_d, res.choice))
    assert chosen_c == res.total_cost <= budget
    assert rel_close(chosen_d, res.total_distortion, 1e-12)
    assert rel_close(res.total_distortion, ref.total_distortion), (res, ref)
    assert res.optimal and res.gap <= 1e-9
    # certified bounds really are lower bounds of the optimum
    assert res.lower_bound <= ref.total_distortion + 1e-9 * max(1, abs(ref.total_distortion))
    assert res.lp_bound <= ref.total_distortion + 1e-9 * max(1, abs(ref.total_distortion))
    return res


def random_instance(rng, n, k, max_cost, kind):
    costs = rng.integers(0, max_cost + 1, size=(n, k))
    if kind == "ties":          # few distinct distortions: many equal options and equal slopes
        d = rng.integers(0, 4, size=(n, k)).astype(float)
    elif kind == "uniform":
        d = rng.random((n, k))
    elif kind == "curve":       # realistic: decreasing in cost with noise, [1,1] = 0
        d = np.exp(-costs / (max_cost / 3 + 1)) * rng.lognormal(0, 0.5, (n, 1)) \
            * rng.lognormal(0, 0.2, (n, k))
    elif kind == "identical":   # every channel the same options: maximal symmetry / ties
        row_c, row_d = costs[0], rng.random(k)
        costs = np.tile(row_c, (n, 1))
        d = np.tile(row_d, (n, 1))
    else:
        raise ValueError(kind)
    return costs, d


@pytest.mark.parametrize("kind", ["ties", "uniform", "curve", "identical"])
def test_random_instances_match_dp(kind):
    rng = np.random.default_rng({"ties": 1, "uniform": 2, "curve": 3, "identical": 4}[kind])
    for _ in range(60):
        n, k = int(rng.integers(1, 80)), int(rng.integers(1, 9))
        costs, d = random_instance(rng, n, k, int(rng.integers(1, 40)), kind)
        lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
        for budget in {lo, hi, int(rng.integers(lo, hi + 1)), (lo + hi) // 2}:
            check_against_reference(costs, d, budget)


def test_ragged_channels_and_single_options_match_dp():
    rng = np.random.default_rng(5)
    for _ in range(40):
        n = int(rng.integers(1, 50))
        costs, dists = [], []
        for _ in range(n):
            k = int(rng.integers(1, 7)) if rng.random() < 0.7 else 1   # many single-option channels
            costs.append(rng.integers(0, 25, size=k))
            dists.append(np.round(rng.random(k) * 4, 1))               # rounded: ties
        lo = sum(int(c.min()) for c in costs)
        hi = sum(int(c.max()) for c in costs)
        for budget in (lo, int(rng.integers(lo, hi + 1)), hi + 3):
            check_against_reference(costs, dists, budget)


def test_tiny_instances_match_brute_force():
    rng = np.random.default_rng(6)
    for _ in range(150):
        n = int(rng.integers(1, 6))
        costs = [rng.integers(0, 6, size=int(rng.integers(1, 5))) for _ in range(n)]
        dists = [rng.integers(0, 3, size=c.size).astype(float) if rng.random() < 0.5
                 else rng.normal(size=c.size) for c in costs]   # negative distortions allowed
        lo = sum(int(c.min()) for c in costs)
        hi = sum(int(c.max()) for c in costs)
        budget = int(rng.integers(lo, hi + 1))
        ref = brute_force_mckp(costs, dists, budget)
        assert rel_close(ref.total_distortion, dp_mckp(costs, dists, budget).total_distortion)
        check_against_reference(costs, dists, budget, ref)


def test_medium_resnet_like_instance_matches_dp():
    """Several sites with real candidate costs, a budget in the interesting range."""
    import secure_inference as si
    rng = np.random.default_rng(8)
    costs, dists = [], []
    for c, h in ((24, 16), (48, 8), (96, 4)):
        sizes = si.candidate_block_sizes(h, h)
        cost = si.candidate_costs(sizes, h, h)
        removed = 1 - cost / cost.max()
        d = rng.lognormal(0, 1, (c, 1)) * removed ** rng.uniform(0.5, 2, (c, 1)) \
            * rng.lognormal(0, 0.25, (c, cost.size))
        costs += [cost] * c
        dists += list(d)
    total = sum(int(c.max()) for c in costs)
    for ratio in (0.0, 0.02, 0.06, 0.3):
        res = check_against_reference(costs, dists, int(ratio * total))
        assert res.total_cost <= int(ratio * total)


def test_budget_zero_with_identity_options():
    costs = np.array([[4, 1, 0], [9, 0, 3]])
    d = np.array([[0.0, 1.0, 5.0], [0.0, 7.0, 2.0]])
    res = solve_mckp(costs, d, 0)
    assert res.choice.tolist() == [2, 1] and res.total_cost == 0 and res.total_distortion == 12.0
    assert res.gap == 0.0 and res.optimal


def test_full_budget_takes_best_options():
    costs = np.array([[4, 1, 0], [9, 0, 3]])
    d = np.array([[0.0, 1.0, 5.0], [0.5, 7.0, 2.0]])
    for budget in (13, 100):
        res = solve_mckp(costs, d, budget)
        assert res.choice.tolist() == [0, 0] and res.total_distortion == 0.5
        assert res.lagrange_multiplier == 0.0 and res.gap == 0.0


def test_equal_costs_keep_lowest_distortion():
    costs = np.array([[2, 2, 2, 0]])
    d = np.array([[3.0, 1.0, 2.0, 9.0]])
    res = solve_mckp(costs, d, 2)
    assert res.choice.tolist() == [1] and res.total_distortion == 1.0


def test_infeasible_budget_is_a_clear_error():
    costs = np.array([[4, 2], [3, 1]])
    d = np.zeros((2, 2))
    with pytest.raises(InfeasibleBudgetError, match="below the smallest achievable total cost 3"):
        solve_mckp(costs, d, 2)
    with pytest.raises(InfeasibleBudgetError):
        dp_mckp(costs, d, 2)


@pytest.mark.parametrize("costs, dists, budget, match", [
    (np.array([[1, 2]]), np.array([[np.nan, 1.0]]), 3, "NaN or infinite"),
    (np.array([[1, 2]]), np.array([[np.inf, 1.0]]), 3, "NaN or infinite"),
    (np.array([[1, -2]]), np.array([[0.0, 1.0]]), 3, ">= 0"),
    (np.array([[1.5, 2]]), np.array([[0.0, 1.0]]), 3, "whole numbers"),
    (np.array([[1, 2]]), np.array([[0.0, 1.0, 2.0]]), 3, "same shape"),
    ([np.array([1, 2])], [np.array([0.0])], 3, "channel 0"),
    ([np.array([], dtype=int)], [np.array([])], 3, "no options"),
    (np.array([[1, 2]]), np.array([[0.0, 1.0]]), -1, "budget must be >= 0"),
    (np.array([[1, 2]]), np.array([[0.0, 1.0]]), 2.5, "whole number"),
])
def test_bad_input(costs, dists, budget, match):
    with pytest.raises(ValueError, match=match):
        solve_mckp(costs, dists, budget)


def test_no_channels():
    res = solve_mckp([], [], 0)
    assert res.choice.size == 0 and res.total_cost == 0 and res.gap == 0.0


def test_state_limit_returns_honest_gap():
    """With the core DP cut off, the answer stays feasible and its bound stays valid."""
    rng = np.random.default_rng(0)
    costs = rng.integers(0, 31, size=(200, 6))
    d = np.exp(-costs / 10) * rng.lognormal(0, 0.5, (200, 1)) * rng.lognormal(0, 0.3, (200, 6))
    budget = int(costs.min(1).sum() + costs.max(1).sum()) // 3
    ref = dp_mckp(costs, d, budget)
    full = check_against_reference(costs, d, budget, ref)
    assert full.core_channels > 0 and full.dp_states > 2   # the instance needs the core DP
    res = solve_mckp(costs, d, budget, max_states=2)
    assert not res.optimal and res.gap > 0
    assert res.total_cost <= budget
    assert res.total_distortion >= ref.total_distortion - 1e-9
    assert full.lp_bound - 1e-9 <= res.lower_bound <= ref.total_distortion + 1e-9
    assert math.isclose(res.gap, (res.total_distortion - res.lower_bound) / res.total_distortion)


def test_flat_instance_input_and_dp_table_guard():
    inst = FlatInstance(np.array([3, 0, 2, 5], dtype=np.int64), np.array([0.0, 4.0, 1.0, 0.0]),
                        np.array([0, 2, 4], dtype=np.int64))
    res = solve_mckp(inst, None, 5)
    assert res.total_cost == 5 and res.total_distortion == 1.0
    with pytest.raises(MemoryError, match="GiB"):
        dp_mckp(np.ones((10_000, 2), dtype=int), np.zeros((10_000, 2)), 10**6,
                max_table_bytes=1 << 20)
