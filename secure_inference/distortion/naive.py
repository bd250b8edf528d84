"""The naive distortion engine: one forward of the whole network per (channel, size), the
reference the others are tested against."""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..brelu import BLOCK_MODULES
from ..multisite import MultiSiteActivation
from ..sites import ReluSite, run_model
from ..spec import apply_block_spec, extract_block_spec
from .base import Progress
from .tensors import output_matrix


def _site_holder(model: nn.Module, site: ReluSite):
    """(container, key) such that container[key] / getattr is the Block-ReLU of the site."""
    module = model.get_submodule(site.module_path)
    if isinstance(module, MultiSiteActivation):
        return module.sites, site.call_index
    parent_path, _, attr = site.module_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def naive_site_sums(model: nn.Module, site: ReluSite, batches: Iterable[torch.Tensor],
                    channels: Sequence[int], sizes: np.ndarray, input_shape: Sequence[int],
                    progress: Progress | None = None) -> np.ndarray:
    """Reference: one whole-network forward per (channel, size) with a Block-ReLU (ReLU6
    sites: a Block-ReLU6) swapped in."""
    net = copy.deepcopy(model).eval()
    current = extract_block_spec(net, input_shape).get(site.name)
    rows = (np.ones((site.channels, 2), np.int32) if current is None else current.copy())
    apply_block_spec(net, {site.name: rows}, input_shape)
    holder, key = _site_holder(net, site)
    batches = list(batches)
    device = batches[0].device

    def install(spec: np.ndarray) -> None:
        module = BLOCK_MODULES[site.activation](spec).to(device)
        if isinstance(key, int):
            holder[key] = module
        else:
            setattr(holder, key, module)

    with torch.no_grad():
        install(rows)
        clean = [output_matrix(run_model(net, x)).double() for x in batches]
        out = np.zeros((len(channels), len(sizes)))
        for ci, c in enumerate(channels):
            for ki, size in enumerate(sizes):
                spec = rows.copy()
                spec[c] = size
                install(spec)
                total = 0.0
                for x, y0 in zip(batches, clean):
                    y = output_matrix(run_model(net, x)).double()
                    total += float((y - y0).pow(2).mean(dim=1).sum())
                out[ci, ki] = total
            if progress is not None:
                progress(sum(len(x) for x in batches) * len(sizes))
    return out
