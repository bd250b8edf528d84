"""DReLU budgets of a study and the uniform Block-ReLU spec that defines most of them.

A budget token is one of:

* ``HxW`` (e.g. ``4x4``): the DReLU count of the uniform spec that gives every channel of
  every replaceable site the patch size H×W (clipped to the site's map);
* a share in (0, 1] (e.g. ``0.05``): ``floor(share × all-ReLU count)``;
* an integer > 1 (e.g. ``12000``): that many DReLUs per image.

Every method is solved at the budget's DReLU count (≤); the uniform method exists only at
``HxW`` budgets, where its count *is* the budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..knapsack import budget_from_ratio
from ..sites import ReluSite, total_relus
from ..spec import Spec, count_drelus

_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Budget:
    """One DReLU budget of the study."""

    label: str                           # the token as given ("4x4", "0.05", "12000")
    drelus: int                          # DReLUs per image allowed
    uniform_size: tuple[int, int] | None  # the patch size that defines it, if any

    @property
    def slug(self) -> str:
        """The label as a file-name-safe string."""
        return label_slug(self.label)


def label_slug(label: str) -> str:
    """A budget label as a file-name-safe string."""
    return re.sub(r"[^0-9A-Za-z_.-]", "_", label)


def parse_budget(token: str) -> tuple[str, object]:
    """``('size', (h, w))``, ``('ratio', r)`` or ``('count', n)`` for a budget token."""
    token = str(token).strip()
    m = _SIZE.match(token)
    if m:
        h, w = int(m.group(1)), int(m.group(2))
        if h < 1 or w < 1:
            raise ValueError(f"budget {token!r}: patch sides must be >= 1")
        return "size", (h, w)
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"budget {token!r} is neither a patch size HxW (e.g. 4x4), a share of "
                         "the all-ReLU count in (0, 1] (e.g. 0.05) nor a DReLU count "
                         "(e.g. 12000)") from None
    if 0 < value <= 1:
        return "ratio", value
    if value > 1 and value == int(value):
        return "count", int(value)
    raise ValueError(f"budget {token!r}: a share must lie in (0, 1] and a count must be a "
                     "positive integer")


def replaceable_sites(sites: Sequence[ReluSite]) -> list[ReluSite]:
    """The sites a Block-ReLU can replace (activation modules, not functional calls)."""
    return [s for s in sites if not s.functional]


def uniform_spec(sites: Sequence[ReluSite], size: tuple[int, int]) -> Spec:
    """Every channel of every replaceable site gets the patch ``size`` (clipped to its map)."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"uniform patch size must be >= 1x1, got {h}x{w}")
    return {s.name: np.tile(np.array([[min(h, s.height), min(w, s.width)]], dtype=np.int32),
                            (s.channels, 1))
            for s in replaceable_sites(sites)}


def resolve_budgets(tokens: Sequence[str], sites: Sequence[ReluSite]) -> list[Budget]:
    """The budgets of ``tokens`` for a model with ``sites``, in the given order.

    Raises ValueError for malformed or duplicate tokens, and for budgets below what
    identity everywhere would reach (0) or above the all-ReLU count.
    """
    total = total_relus(sites)
    out: list[Budget] = []
    for token in tokens:
        kind, value = parse_budget(token)
        size = None
        if kind == "size":
            size = value  # type: ignore[assignment]
            drelus = count_drelus(uniform_spec(sites, size), sites)["total"]
        elif kind == "ratio":
            drelus = budget_from_ratio(value, total)  # type: ignore[arg-type]
        else:
            drelus = int(value)  # type: ignore[arg-type]
            if drelus > total:
                raise ValueError(f"budget {token}: more DReLUs than the all-ReLU count "
                                 f"({total:,})")
        out.append(Budget(str(token).strip(), int(drelus), size))
    labels = [b.label for b in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate budgets in {labels}")
    return out
