"""The methods of the study: each turns a DReLU budget into a block spec for the same model.

=================  ======================================================================
knapsack           per-channel patch sizes by the exact knapsack over *exact* distortion
knapsack_bytes     the knapsack over exact distortion with every option priced in *bytes on
                   the wire* (:mod:`secure_inference.knapsack.costs`), under a byte budget
                   equal to the exact bytes per image of the ``knapsack`` (DReLU-count)
                   spec at the same budget: both are compared at equal bytes per image
knapsack_linear    the same knapsack over the *linear* (first-order) distortion estimate
uniform            one patch size H×W for every channel (only at ``HxW`` budgets)
linearisation      the knapsack restricted to {ReLU [1,1], identity [0,1]} per channel
                   (channel linearisation in the style of SNL / DeepReDuce)
knapsack_kd        the knapsack spec, finetuned with distillation from the baseline
iterative          knapsack in rounds: solve at a budget between the all-ReLU count and
                   the target, apply that spec, re-measure the distortion on the network
                   *with the spec applied* (so every channel is judged in the context of
                   the reductions already made), solve again at a lower budget, … ; the
                   budgets fall geometrically and the last round solves at the target
=================  ======================================================================

Distortion is measured once per method and network (cached on disk through the resumable
extraction jobs of :mod:`secure_inference.distortion.jobs`); sites that are not replaceable
(functional ReLU calls) keep all their ReLUs and their count is taken off the budget first.

Every spec's exact bytes per image (:func:`spec_wire_bytes`: the runtime's fused DReLU layer
of every site, the fixed sites included, at one comparison width ``bytes_width``, 64 by
default) are recorded next to its DReLUs. ``knapsack_bytes`` is the only method whose DReLU
count may exceed the budget's: its budget is the bytes, not the DReLUs.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..distortion.jobs import Job, run_job
from ..distortion.store import SiteDistortion
from ..knapsack import all_relu_count, knapsack_block_spec
from ..knapsack.costs import site_bytes, spec_bytes
from ..sites import ReluSite, find_relu_sites, total_drelus
from ..spec import Spec, apply_block_spec, count_drelus
from .budgets import Budget, uniform_spec


@dataclass(frozen=True)
class Method:
    """How one method builds its spec and how its finetune differs."""

    name: str
    description: str
    distortion: str | None      # distortion method its knapsack reads (None: no knapsack)
    distill: bool = False       # finetune with distillation from the baseline


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("knapsack", "knapsack over exact per-channel distortion", "exact"),
    Method("knapsack_bytes", "knapsack over exact distortion priced in bytes on the wire, at "
           "the knapsack's bytes per image", "exact"),
    Method("knapsack_linear", "knapsack over the linear distortion estimate", "linear"),
    Method("uniform", "one patch size for every channel (HxW budgets only)", None),
    Method("linearisation", "knapsack restricted to {ReLU, identity} per channel", "exact"),
    Method("knapsack_kd", "knapsack spec, finetuned with knowledge distillation", "exact",
           distill=True),
    Method("iterative", "knapsack in rounds, distortion re-measured with the spec applied",
           "exact"),
]}

RELU = (1, 1)
IDENTITY = (0, 1)


@dataclass
class BuiltSpec:
    """A method's spec at a budget, its DReLU count and exact bytes per image (at the
    builder's ``bytes_width``) and how it was found."""

    spec: Spec
    drelus: int
    details: dict = field(default_factory=dict)
    bytes: int | None = None


def spec_wire_bytes(spec: Mapping[str, np.ndarray], sites: Sequence[ReluSite],
                    width: int = 64) -> int:
    """Exact bytes per image that the secure runtime sends for the DReLU layers of every site
    of ``sites`` under ``spec`` (sites absent from it: ordinary ReLU), every layer compared
    at ``width`` bits (:func:`secure_inference.knapsack.costs.site_bytes`)."""
    total = 0
    for s in sites:
        sizes = spec[s.name] if s.name in spec else np.ones((s.channels, 2), np.int32)
        total += site_bytes(np.asarray(sizes), s.height, s.width, int(width), s.activation)
    return int(total)


def spec_digest(spec: Mapping[str, np.ndarray]) -> str:
    """A hash of a spec's site names and block sizes (names a cache folder)."""
    h = hashlib.sha256()
    for name in sorted(spec):
        arr = np.ascontiguousarray(np.asarray(spec[name], dtype=np.int32))
        h.update(f"{name}:{arr.shape};".encode() + arr.tobytes())
    return h.hexdigest()


def restrict_candidates(results: Mapping[str, SiteDistortion],
                        allowed: Sequence[Sequence[int]] = (RELU, IDENTITY)
                        ) -> dict[str, SiteDistortion]:
    """The distortion results with only the candidate sizes in ``allowed`` (rows [h, w];
    any size with a zero side counts as identity). Raises ValueError when a site has none."""
    def key(hw) -> tuple[int, int]:
        h, w = int(hw[0]), int(hw[1])
        return IDENTITY if h == 0 or w == 0 else (h, w)

    wanted = {key(a) for a in allowed}
    out: dict[str, SiteDistortion] = {}
    for name, r in results.items():
        keep = np.array([key(b) in wanted for b in r.block_sizes])
        if not keep.any():
            raise ValueError(f"site '{name}' has none of the candidate sizes {sorted(wanted)}; "
                             "measure the distortion with those candidates")
        out[name] = SiteDistortion(site=r.site, distortion=r.distortion[:, keep],
                                   block_sizes=r.block_sizes[keep], costs=r.costs[keep],
                                   channels=r.channels, height=r.height, width=r.width,
                                   num_samples=r.num_samples, seed=r.seed,
                                   activation=r.activation)
    return out


def round_budgets(total: int, target: int, rounds: int) -> list[int]:
    """``rounds`` budgets falling geometrically from ``total`` towards ``target``; the last is
    ``target`` exactly, each is ≤ the one before."""
    if rounds < 1:
        raise ValueError(f"iterative rounds must be >= 1, got {rounds}")
    if not 0 <= target <= total:
        raise ValueError(f"target budget {target} outside [0, {total}]")
    ratio = max(target, 1) / max(total, 1)
    out = [int(math.floor(total * ratio ** (r / rounds))) for r in range(1, rounds)]
    out.append(int(target))
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1])
    return [max(b, target) for b in out]


class SpecBuilder:
    """Builds every method's spec at a budget for one baseline model and one sample set.

    ``model``: the baseline network (an MMLab model with weights loaded); ``samples``: its
    preprocessed inputs [N, C, H, W] for distortion measurement; ``cache_dir``: where
    distortion runs are stored (resumable; a rerun reads them back). ``model_id`` names the
    model in the distortion fingerprints. ``remeasure_samples``: how many of the samples the
    iterative method's re-measurements use (None: all); exact distortion of a network full of
    Block-ReLUs costs about three times that of the baseline. ``bytes_width``: the comparison
    width (bits) at which every spec's bytes per image are counted and at which
    ``knapsack_bytes`` prices its options (64: the runtime's default without calibration).
    """

    def __init__(self, model: nn.Module, samples: torch.Tensor, cache_dir: str | Path, *,
                 model_id: str, seed: int = 0, num_projections: int = 8,
                 iterative_rounds: int = 3, iterative_distortion: str = "exact",
                 remeasure_samples: int | None = None, batch_size: int = 16,
                 forward_batch: int = 64, bytes_width: int = 64) -> None:
        if remeasure_samples is not None and not 1 <= remeasure_samples <= len(samples):
            raise ValueError(f"remeasure_samples must lie in [1, {len(samples)}], got "
                             f"{remeasure_samples}")
        self.model = model.eval()
        self.samples = samples
        self.cache_dir = Path(cache_dir)
        self.model_id = model_id
        self.seed = int(seed)
        self.num_projections = int(num_projections)
        self.iterative_rounds = int(iterative_rounds)
        self.iterative_distortion = iterative_distortion
        self.remeasure_samples = remeasure_samples
        self.bytes_width = int(bytes_width)
        self.batch_size = int(batch_size)
        self.forward_batch = int(forward_batch)
        self.input_shape = tuple(int(s) for s in samples.shape[1:])
        self.sites: list[ReluSite] = find_relu_sites(model, self.input_shape)
        self._memo: dict[tuple[str, str], dict[str, SiteDistortion]] = {}

    # ------------------------------------------------------------------ distortion
    def distortion(self, method: str, spec: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, SiteDistortion]:
        """Distortion of the baseline (or of the baseline with ``spec`` applied, on the first
        ``remeasure_samples`` samples), cached."""
        digest = spec_digest(spec) if spec else ""
        key = (method, digest)
        if key not in self._memo:
            net, samples = self.model, self.samples
            folder = self.cache_dir / method
            model_id = self.model_id
            if spec:
                net = apply_block_spec(copy.deepcopy(self.model), spec, self.input_shape)
                folder = self.cache_dir / f"{method}_with_spec_{digest[:16]}"
                model_id = f"{self.model_id} with spec {digest[:16]}"
                samples = self.samples[:self.remeasure_samples]
            job = Job(model=net, model_id=model_id, samples=samples, seed=self.seed,
                      method=method, num_projections=self.num_projections,
                      batch_size=self.batch_size, forward_batch=self.forward_batch)
            results = run_job(job, folder)
            assert results is not None  # run_job only stops early with max_chunks
            self._memo[key] = results
        return self._memo[key]

    # ------------------------------------------------------------------ specs
    def _fixed_drelus(self, results: Mapping[str, SiteDistortion]) -> int:
        """DReLUs of the sites the distortion does not cover (they stay ReLU)."""
        return total_drelus(self.sites) - all_relu_count(results)

    def _knapsack(self, results: Mapping[str, SiteDistortion], drelus: int) -> tuple[Spec, dict]:
        budget = drelus - self._fixed_drelus(results)
        if budget < 0:
            raise ValueError(f"budget {drelus:,} is below the {self._fixed_drelus(results):,} "
                             "DReLUs of the sites that cannot be replaced")
        sol = knapsack_block_spec(results, budget)
        res = sol.result
        return sol.spec, {"solver_cost": int(res.total_cost),
                          "solver_distortion": float(res.total_distortion),
                          "optimal": bool(res.optimal)}

    def wire_bytes(self, spec: Mapping[str, np.ndarray]) -> int:
        """Exact bytes per image of ``spec`` on this model at ``bytes_width``."""
        return spec_wire_bytes(spec, self.sites, self.bytes_width)

    def _knapsack_bytes(self, budget: Budget) -> tuple[Spec, dict]:
        """The byte-priced knapsack under the exact bytes of the count knapsack's spec."""
        results = self.distortion("exact")
        widths = {name: self.bytes_width for name in results}
        count_spec, _ = self._knapsack(results, budget.drelus)
        bound = spec_bytes(results, count_spec, widths)   # the replaceable sites' bytes
        sol = knapsack_block_spec(results, bound, cost="bytes", widths=widths)
        res = sol.result
        fixed = self.wire_bytes(count_spec) - bound        # the fixed sites' (all ReLU) bytes
        return sol.spec, {"byte_budget": int(bound + fixed),
                          "byte_budget_replaceable": int(bound),
                          "bytes_width": self.bytes_width,
                          "solver_cost_units": int(res.total_cost),
                          "solver_distortion": float(res.total_distortion),
                          "optimal": bool(res.optimal)}

    def build(self, method: str, budget: Budget) -> BuiltSpec:
        """The spec of ``method`` at ``budget`` (DReLUs ≤ budget; uniform: = budget;
        knapsack_bytes: bytes ≤ those of the knapsack's spec at ``budget``)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        info = METHODS[method]
        if method == "uniform":
            if budget.uniform_size is None:
                raise ValueError(f"the uniform method needs a patch-size budget (e.g. 4x4), "
                                 f"got {budget.label!r}")
            spec, details = uniform_spec(self.sites, budget.uniform_size), {}
        elif method == "iterative":
            spec, details = self._iterative(budget.drelus)
        elif method == "knapsack_bytes":
            spec, details = self._knapsack_bytes(budget)
        else:
            results = self.distortion(info.distortion or "exact")
            if method == "linearisation":
                results = restrict_candidates(results)
            spec, details = self._knapsack(results, budget.drelus)
        drelus = count_drelus(spec, self.sites)["total"]
        nbytes = self.wire_bytes(spec)
        if method == "knapsack_bytes":
            if nbytes > details["byte_budget"]:
                raise RuntimeError(f"{method} at {budget.label}: spec sends {nbytes:,} bytes "
                                   f"per image, above the budget {details['byte_budget']:,}")
        elif drelus > budget.drelus:
            raise RuntimeError(f"{method} at {budget.label}: spec has {drelus:,} DReLUs, "
                               f"above the budget {budget.drelus:,}")
        return BuiltSpec(spec, drelus, details, nbytes)

    def _iterative(self, drelus: int) -> tuple[Spec, dict]:
        first = self.distortion(self.iterative_distortion)
        fixed = self._fixed_drelus(first)
        targets = round_budgets(all_relu_count(first), drelus - fixed, self.iterative_rounds)
        spec: Spec | None = None
        rounds = []
        for i, target in enumerate(targets):
            results = first if spec is None else self.distortion(self.iterative_distortion,
                                                                 spec)
            spec, details = self._knapsack(results, target + fixed)
            rounds.append(dict(budget=int(target + fixed), **details))
        assert spec is not None
        return spec, {"rounds": rounds, "distortion": self.iterative_distortion}
