"""``extract``: the distortion of every (site, channel, candidate size) for a plain torch model."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn

from ..candidates import candidate_block_sizes, candidate_costs
from ..sites import ReluSite, find_relu_sites, model_device
from .base import REPLACEABLE_KINDS, DistortionError, Progress
from .calls import trace_calls
from .exact import exact_site_sums
from .linear import linear_sums
from .naive import naive_site_sums
from .tensors import iter_batches
from .store import SiteDistortion

METHODS = ("exact", "linear", "naive")


def resolve_sites(model: nn.Module, input_shape: Sequence[int],
                  names: Sequence[str] | None = None) -> list[ReluSite]:
    """The sites to measure, in forward order.

    ``names=None`` selects every site whose activation module can become a Block-ReLU or, for
    a ReLU6 module, a Block-ReLU6 (functional ``F.relu``/``F.relu6`` calls cannot be replaced
    and are left out). Named sites must exist and be replaceable.
    """
    sites = find_relu_sites(model, input_shape)
    if isinstance(names, str):
        names = [names]
    if names is None:
        chosen = [s for s in sites if not s.functional]
    else:
        by_name = {s.name: s for s in sites}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DistortionError(f"unknown site name(s) {unknown}; the model has "
                                  f"{len(sites)} sites, e.g. {[s.name for s in sites[:4]]}")
        wanted = set(names)
        chosen = [s for s in sites if s.name in wanted]
        for s in chosen:
            if s.functional:
                raise DistortionError(f"site '{s.name}' is a functional {s.kind} call; only "
                                      "activation modules can be replaced by Block-ReLUs")
    for s in chosen:
        if s.kind not in REPLACEABLE_KINDS:
            raise DistortionError(f"site '{s.name}' is a {s.kind}, which no block module "
                                  f"replaces (replaceable: {', '.join(REPLACEABLE_KINDS)})")
    if not chosen:
        raise DistortionError("the model has no replaceable ReLU sites")
    return chosen


def site_candidates(site: ReluSite, max_rect: int = 4,
                    max_block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate sizes [K, 2] and their DReLU costs [K] for one site (a ReLU6 site's
    patches cost two DReLUs each)."""
    sizes = candidate_block_sizes(site.height, site.width, max_rect=max_rect,
                                  max_size=max_block_size)
    return sizes, site.drelus_per_patch * candidate_costs(sizes, site.height, site.width)


def extract(model: nn.Module, samples, sites: Sequence[str] | None = None,
            method: str = "exact", *, batch_size: int | None = None, max_rect: int = 4,
            max_block_size: int | None = None, forward_batch: int = 64,
            num_projections: int = 8, seed: int = 0,
            progress: Progress | None = None) -> dict[str, SiteDistortion]:
    """Distortion of every channel and candidate block size of the chosen sites.

    ``samples``: the model's real inputs (after normalisation), a tensor [N, C, H, W] (split
    into ``batch_size`` rows) or a re-iterable of such batches. ``method``: 'exact' (default),
    'linear' (first-order estimate from ``num_projections`` random output projections per
    sample, drawn from generators seeded from ``seed``) or 'naive' (one forward per
    candidate; the reference). ``forward_batch``: rows per batched forward in 'exact'.
    ``progress(n)`` is called with the number of candidate×sample evaluations done.
    Returns {site name: SiteDistortion} in forward order; BN etc. run in eval mode.
    """
    if method not in METHODS:
        raise DistortionError(f"unknown method {method!r}; choose one of {METHODS}")
    device = model_device(model)
    batches = [b.to(device) for b in iter_batches(samples, batch_size)]
    num = sum(b.shape[0] for b in batches)
    input_shape = tuple(batches[0].shape[1:])
    was_training = model.training
    model.eval()
    try:
        chosen = resolve_sites(model, input_shape, sites)
        cands = {s.name: site_candidates(s, max_rect, max_block_size) for s in chosen}
        sums: dict[str, np.ndarray] = {}
        if method == "linear":
            calls = trace_calls(model, batches[0][:1])
            sums = linear_sums(model, calls, chosen, batches, {k: v[0] for k, v in cands.items()},
                               num_projections=num_projections, seed=seed, progress=progress)
        else:
            calls = trace_calls(model, batches[0][:1]) if method == "exact" else None
            for s in chosen:
                channels = range(s.channels)
                if method == "exact":
                    sums[s.name] = exact_site_sums(model, calls, s, batches, channels,
                                                   cands[s.name][0], forward_batch, progress)
                else:
                    sums[s.name] = naive_site_sums(model, s, batches, channels,
                                                   cands[s.name][0], input_shape, progress)
    finally:
        model.train(was_training)
    out: dict[str, SiteDistortion] = {}
    for s in chosen:
        sizes, costs = cands[s.name]
        dist = sums[s.name] / num
        if not np.all(np.isfinite(dist)):
            raise DistortionError(f"site '{s.name}': non-finite distortion values")
        out[s.name] = SiteDistortion(site=s.name, distortion=dist, block_sizes=sizes,
                                     costs=costs, channels=s.channels, height=s.height,
                                     width=s.width, num_samples=num, seed=int(seed),
                                     activation=s.activation)
    return out
