"""Activation sites: every call of a ReLU-like activation in a model's forward pass.

A site is one *call*, not one module: torchvision's and mmpretrain's BasicBlock call
``self.relu`` twice, which gives two sites. Site names are stable across input sizes:

* an activation module called once per forward: its module path (``layer1.0.relu``);
* an activation module called k > 1 times: ``path#0`` … ``path#{k-1}`` in call order;
* a functional call (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.relu6``) made inside
  module M: ``M_path:relu`` (``:relu#i`` when M makes several such calls; ``:relu`` alone
  at the root).

Each site records its ``activation``: ``"relu6"`` for ReLU6 (``nn.ReLU6``, ``F.relu6``, a
Block-ReLU6 or a shared module's ReLU6 call), ``"relu"`` otherwise; a ReLU6 site's patches cost
two DReLUs each (:func:`secure_inference.brelu.drelus_per_patch`).
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .brelu import RELU, RELU6, BlockReLU, BlockReLU6, drelus_per_patch
from .tracing import ModuleTracer
from .multisite import MultiSiteActivation

RELU_MODULE_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6, BlockReLU, BlockReLU6)
RELU6_KINDS = ("ReLU6", "BlockReLU6", "F.relu6")
"""Site kinds whose activation is ReLU6."""


@dataclass(frozen=True)
class ReluSite:
    """One call of a ReLU-like activation, with the shape of its output for one input size."""

    name: str
    kind: str          # 'ReLU', 'ReLU6', 'BlockReLU', 'BlockReLU6', 'MultiSiteActivation'
    #                    (modules) or 'F.relu', 'F.relu6' (functional)
    module_path: str   # the activation module (or, for functional calls, the enclosing module)
    call_index: int    # which call of that module / function within one forward
    channels: int
    height: int
    width: int
    activation: str = RELU   # 'relu' or 'relu6' (module docstring)

    @property
    def num_relus(self) -> int:
        """Activations at this site for one image (= DReLUs of an all-ReLU site)."""
        return self.channels * self.height * self.width

    @property
    def drelus_per_patch(self) -> int:
        """DReLUs per patch (and per pixel of a [1, 1] channel): 1 for ReLU, 2 for ReLU6."""
        return drelus_per_patch(self.activation)

    @property
    def num_drelus(self) -> int:
        """DReLUs of the site's original activation for one image (ReLU6: two per value)."""
        return self.drelus_per_patch * self.num_relus

    @property
    def functional(self) -> bool:
        return self.kind.startswith("F.")


def _is_relu_module(module: nn.Module) -> bool:
    return isinstance(module, RELU_MODULE_TYPES + (MultiSiteActivation,))


def _module_kind(module: nn.Module) -> str:
    return type(module).__name__


def _activation(kind: str, module: nn.Module | None, call: int) -> str:
    """'relu6' or 'relu' for one call (a shared module's call: the module standing in for it)."""
    if isinstance(module, MultiSiteActivation):
        kind = _module_kind(module.sites[call % len(module.sites)])
    return RELU6 if kind in RELU6_KINDS else RELU


def _functional_kind(func, args, kwargs) -> str | None:
    relu_funcs = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_,
                  torch.Tensor.relu, torch.Tensor.relu_}
    if func in relu_funcs:
        return "F.relu"
    if func is nn.functional.relu6:
        return "F.relu6"
    if func in (nn.functional.hardtanh, nn.functional.hardtanh_):
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        if lo == 0.0 and hi == 6.0:
            return "F.relu6"
    return None


def _shape_chw(out: Any) -> tuple[int, int, int]:
    if not torch.is_tensor(out):
        raise TypeError(f"activation returned {type(out).__name__}, expected a tensor")
    if out.dim() == 4:
        return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])
    if out.dim() == 2:
        return int(out.shape[1]), 1, 1
    raise ValueError(f"activation output of shape {list(out.shape)} is neither [N, C, H, W] "
                     "nor [N, C]")


class _Tracer(ModuleTracer):
    """Records activation calls in order; module calls via hooks, functional ones via the mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.calls: list[tuple[str, str, str, tuple[int, int, int]]] = []  # kind, path, key, shape
        self.modules: dict[str, nn.Module] = {}   # path -> activation module (module calls)

    def on_module(self, module, args, out):
        if _is_relu_module(module) and not self._inside_relu_module():
            path = self.paths[module]
            self.modules[path] = module
            self.calls.append((_module_kind(module), path, path, _shape_chw(out)))

    def _inside_relu_module(self) -> bool:
        return any(_is_relu_module(m) for m in self.stack)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._inside_relu_module():
            return out
        kind = _functional_kind(func, args, kwargs)
        if kind is not None:
            parent = self.current_path()
            fn = kind.split(".", 1)[1]
            self.calls.append((kind, parent, f"{parent}:{fn}", _shape_chw(out)))
        return out


def model_input(input_shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """A random input of ``input_shape`` = (C, H, W) or (N, C, H, W)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape}")
    return torch.randn(shape, device=device, dtype=dtype)


def run_model(model: nn.Module, x: torch.Tensor):
    """Plain forward: ``model(x)``; MMLab models (mmengine BaseModel) in ``mode='tensor'``."""
    try:
        from mmengine.model import BaseModel
    except ImportError:  # pragma: no cover - mmengine is a dependency
        BaseModel = ()
    if isinstance(model, BaseModel):
        return model(x, mode="tensor")
    return model(x)


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def find_relu_sites(model: nn.Module, input_shape: Sequence[int]) -> list[ReluSite]:
    """Every ReLU-like activation call of ``model`` in forward order, for one input size.

    Runs one forward (eval mode, no grad) on a random input of ``input_shape`` = (C, H, W)
    or (N, C, H, W); the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    tracer = _Tracer(model)
    try:
        model.eval()
        x = model_input(input_shape, device=model_device(model))
        with torch.no_grad(), tracer:
            run_model(model, x)
    finally:
        tracer.remove()
        model.train(was_training)
    counts: dict[str, int] = defaultdict(int)
    for _, _, key, _ in tracer.calls:
        counts[key] += 1
    seen: dict[str, int] = defaultdict(int)
    sites = []
    for kind, path, key, (c, h, w) in tracer.calls:
        idx = seen[key]
        seen[key] += 1
        name = key if counts[key] == 1 else f"{key}#{idx}"
        act = _activation(kind, tracer.modules.get(key), idx)
        sites.append(ReluSite(name=name, kind=kind, module_path=path, call_index=idx,
                              channels=c, height=h, width=w, activation=act))
    return sites


def sites_by_name(sites: Sequence[ReluSite]) -> "OrderedDict[str, ReluSite]":
    """Sites keyed by name, in forward order."""
    return OrderedDict((s.name, s) for s in sites)


def total_relus(sites: Sequence[ReluSite]) -> int:
    """Activations per image over all sites (the all-ReLU DReLU count of a ReLU network)."""
    return sum(s.num_relus for s in sites)


def total_drelus(sites: Sequence[ReluSite]) -> int:
    """DReLUs per image of the sites' original activations (ReLU6 sites: two per value)."""
    return sum(s.num_drelus for s in sites)
