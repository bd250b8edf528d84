"""secure-inference: ReLU-efficient private CNN inference with knapsack-chosen Block-ReLUs.

Importing the package applies the compatibility fixes this environment needs (see
:mod:`secure_inference.mmlab.compat`) before torchvision or the MMLab packages load.
"""
from .mmlab import compat as _compat

_compat.apply_all()

from .brelu import BlockReLU, block_cost, block_costs  # noqa: E402
from .candidates import candidate_block_sizes, candidate_costs  # noqa: E402
from .conversions import maxpool_to_avgpool, relu6_to_relu  # noqa: E402
from .sites import ReluSite, find_relu_sites, total_relus  # noqa: E402
from .spec import (MultiSiteActivation, SpecError, apply_block_spec, count_drelus,  # noqa: E402
                   extract_block_spec, load_spec, save_spec, spec_from_json, spec_to_json)

__version__ = "0.1.0"

__all__ = [
    "BlockReLU", "block_cost", "block_costs", "candidate_block_sizes", "candidate_costs",
    "maxpool_to_avgpool", "relu6_to_relu", "ReluSite", "find_relu_sites", "total_relus",
    "MultiSiteActivation", "SpecError", "apply_block_spec", "count_drelus", "extract_block_spec",
    "load_spec", "save_spec", "spec_from_json", "spec_to_json",
]
