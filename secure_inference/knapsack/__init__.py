"""Multiple-choice knapsack solvers: pick one block size per channel under a DReLU or byte budget.

:func:`solve_mckp` is the exact solver (convex-hull Lagrangian relaxation completed to the
exact optimum with a certified gap); :mod:`.reference` holds the plain dynamic-programming and
brute-force references used by the tests and the benchmark; :mod:`.costs` prices each option in
DReLUs or in the exact bytes the secure runtime sends for it; :mod:`.blocks` turns distortion
results into block specs (budgets, checks, per-site reports).
"""
from .blocks import (KnapsackSolution, all_relu_count, budget_from_ratio, check_against_sites,
                     check_distortion_results, knapsack_block_spec, plot_site_bytes,
                     plot_site_drelus, site_table, site_table_csv, site_table_markdown)
from .costs import (COSTS, UNITS_PER_BYTE, all_relu_bytes, byte_budget_units, option_units,
                    site_bytes, site_widths, spec_bytes, spec_site_bytes)
from .mckp import FlatInstance, InfeasibleBudgetError, MCKPResult, as_flat_instance, solve_mckp
from .reference import ReferenceResult, brute_force_mckp, dp_mckp

__all__ = ["FlatInstance", "InfeasibleBudgetError", "MCKPResult", "as_flat_instance",
           "solve_mckp", "ReferenceResult", "brute_force_mckp", "dp_mckp",
           "KnapsackSolution", "all_relu_count", "budget_from_ratio", "check_against_sites",
           "check_distortion_results", "knapsack_block_spec", "plot_site_bytes",
           "plot_site_drelus", "site_table", "site_table_csv", "site_table_markdown",
           "COSTS", "UNITS_PER_BYTE", "all_relu_bytes", "byte_budget_units", "option_units",
           "site_bytes", "site_widths", "spec_bytes", "spec_site_bytes"]
