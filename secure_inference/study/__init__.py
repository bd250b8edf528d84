"""Accuracy-per-DReLU study: several ways of spending one DReLU budget, finetuned and compared.

* :mod:`.budgets`  DReLU budgets (uniform patch sizes, shares of the all-ReLU count, counts)
  and the uniform Block-ReLU spec;
* :mod:`.methods`  the methods (knapsack from exact or linear distortion, knapsack priced in
  bytes at the count knapsack's bytes, uniform, channel linearisation, knapsack +
  distillation, iterative knapsack), each building a spec at a budget, and the exact bytes
  per image of a spec;
* :mod:`.results`  the results JSON (atomic, resumable) and the run plan;
* :mod:`.runs`     finetuning and evaluating one run, and the study loop;
* :mod:`.report`   table and plots of accuracy against DReLUs and against bytes per image.

``research/compare_methods.py`` is the command line around these.
"""
from .budgets import Budget, parse_budget, resolve_budgets, uniform_spec
from .methods import METHODS, BuiltSpec, SpecBuilder, restrict_candidates
from .results import ResultsFile, RunKey, plan_runs

__all__ = ["Budget", "parse_budget", "resolve_budgets", "uniform_spec", "METHODS", "BuiltSpec",
           "SpecBuilder", "restrict_candidates", "ResultsFile", "RunKey", "plan_runs"]
