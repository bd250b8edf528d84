"""The stand-in for one activation module called at several sites of a forward pass.

A base module (it imports only torch): :mod:`secure_inference.sites` recognises it while
tracing and :mod:`secure_inference.spec` builds it when a spec replaces some calls of a shared
activation. ``secure_inference.spec.MultiSiteActivation`` remains an alias.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MultiSiteActivation(nn.Module):
    """Stands in for an activation module called at several sites of one forward.

    The k-th call after the owning (parent) module starts its forward goes to ``sites[k]``;
    the parent's forward pre-hook resets the counter, and the counter wraps around, so an
    interrupted forward cannot shift later ones.
    """

    def __init__(self, sites: Sequence[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self._next_call = 0

    def reset_calls(self) -> None:
        self._next_call = 0

    def skip_call(self) -> None:
        """Advance to the next site without computing (a caller that substitutes this call)."""
        self._next_call = (self._next_call + 1) % len(self.sites)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._next_call
        self._next_call = (k + 1) % len(self.sites)
        return self.sites[k](x)
