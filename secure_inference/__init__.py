"""secure-inference: ReLU-efficient private CNN inference with knapsack-chosen Block-ReLUs.

Importing the package is cheap (no torch): the command lines in :mod:`secure_inference.cli`
parse their arguments first. The compatibility fixes this environment needs (see
:mod:`secure_inference.mmlab.compat`) are applied as soon as torch is loaded and before
torchvision or the MMLab packages load (see :mod:`secure_inference._compat_hook`); the names
below load on first use.
"""
from __future__ import annotations


from . import _compat_hook
from ._lazy import lazy_exports

_compat_hook.install()

__version__ = "0.1.0"

_EXPORTS = {
    "brelu": ("BlockReLU", "BlockReLU6", "block_cost", "block_costs"),
    "candidates": ("candidate_block_sizes", "candidate_costs"),
    "conversions": ("maxpool_to_avgpool", "relu6_to_relu"),
    "sites": ("ReluSite", "find_relu_sites", "total_drelus", "total_relus"),
    "spec": ("MultiSiteActivation", "SpecError", "apply_block_spec", "count_drelus",
             "extract_block_spec", "load_spec", "save_spec", "spec_from_json", "spec_to_json"),
}

__all__ = [
    "BlockReLU", "BlockReLU6", "block_cost", "block_costs", "candidate_block_sizes",
    "candidate_costs", "maxpool_to_avgpool", "relu6_to_relu", "ReluSite", "find_relu_sites",
    "total_drelus", "total_relus",
    "MultiSiteActivation", "SpecError", "apply_block_spec", "count_drelus", "extract_block_spec",
    "load_spec", "save_spec", "spec_from_json", "spec_to_json",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
