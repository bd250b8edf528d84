"""Plain exact references for the multiple-choice knapsack: a cost-indexed dynamic program
(the original research method: a table of channels × budget values) and brute force.

They exist to check :func:`secure_inference.knapsack.solve_mckp` and as the benchmark baseline;
the DP needs O(channels × budget) memory and O(options × budget) time, so use it only for
small budgets.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numba
import numpy as np

from .mckp import InfeasibleBudgetError, as_flat_instance

__all__ = ["ReferenceResult", "dp_mckp", "brute_force_mckp", "dp_table_bytes"]


@dataclass
class ReferenceResult:
    """An optimal choice (one option index per channel) with its totals."""

    choice: np.ndarray
    total_cost: int
    total_distortion: float


@numba.njit(cache=True)
def _dp_fill(costs, dists, offsets, budget, choice):  # pragma: no cover - compiled
    """best[b] = least distortion of the channels so far with total cost <= b."""
    n = offsets.size - 1
    prev = np.zeros(budget + 1, np.float64)   # no channel: cost 0 fits every b
    cur = np.empty(budget + 1, np.float64)
    for i in range(n):
        a, e = offsets[i], offsets[i + 1]
        for b in range(budget + 1):
            best = np.inf
            arg = -1
            for j in range(a, e):
                c = costs[j]
                if c <= b:
                    val = prev[b - c] + dists[j]
                    if val < best:
                        best = val
                        arg = j - a
            cur[b] = best
            choice[i, b] = arg
        prev, cur = cur, prev
    return prev[budget]


def dp_table_bytes(num_channels: int, budget: int, max_options: int) -> int:
    """Bytes of the choice table :func:`dp_mckp` allocates."""
    itemsize = 1 if max_options <= 127 else (2 if max_options <= 32767 else 4)
    return num_channels * (budget + 1) * itemsize


def dp_mckp(costs, distortions, budget: int, *, max_table_bytes: int = 4 << 30) -> ReferenceResult:
    """Exact optimum by a dynamic program over every budget value 0..budget.

    Same inputs as :func:`~secure_inference.knapsack.solve_mckp`. Refuses instances whose
    choice table would exceed ``max_table_bytes``.
    """
    inst = as_flat_instance(costs, distortions)
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = inst.num_channels
    lengths = np.diff(inst.offsets)
    kmax = int(lengths.max()) if n else 1
    need = dp_table_bytes(n, budget, kmax)
    if need > max_table_bytes:
        raise MemoryError(f"the DP choice table needs {need / 2**30:.1f} GiB "
                          f"(channels {n} × budget {budget}); over max_table_bytes")
    dtype = np.int8 if kmax <= 127 else (np.int16 if kmax <= 32767 else np.int32)
    table = np.empty((n, budget + 1), dtype=dtype)
    best = _dp_fill(inst.costs, inst.distortions, inst.offsets, budget, table) if n else 0.0
    if not math.isfinite(best):
        raise InfeasibleBudgetError(f"budget {budget} is below the smallest achievable cost")
    choice = np.empty(n, np.int64)
    b = budget
    for i in range(n - 1, -1, -1):
        k = int(table[i, b])
        choice[i] = k
        b -= int(inst.costs[inst.offsets[i] + k])
    flat = inst.offsets[:-1] + choice
    return ReferenceResult(choice, int(inst.costs[flat].sum()),
                           float(math.fsum(inst.distortions[flat])))


def brute_force_mckp(costs, distortions, budget: int) -> ReferenceResult:
    """Exact optimum by enumerating every combination (tiny instances only)."""
    inst = as_flat_instance(costs, distortions)
    n = inst.num_channels
    ranges = [range(int(inst.offsets[i + 1] - inst.offsets[i])) for i in range(n)]
    if math.prod(len(r) for r in ranges) > 2_000_000:
        raise ValueError("too many combinations for brute force")
    best, best_choice = math.inf, None
    for combo in itertools.product(*ranges):
        flat = inst.offsets[:-1] + np.asarray(combo, dtype=np.int64)
        if inst.costs[flat].sum() <= budget:
            d = math.fsum(inst.distortions[flat])
            if d < best:
                best, best_choice = d, flat
    if best_choice is None:
        raise InfeasibleBudgetError(f"budget {budget} is below the smallest achievable cost")
    return ReferenceResult(best_choice - inst.offsets[:-1], int(inst.costs[best_choice].sum()),
                           float(best))
