"""Compatibility fixes for CPU-only torch next to the PyPI torchvision/mmcv-lite wheels.

Each fix is applied only where it is needed, once torch is loaded after ``import
secure_inference`` and before torchvision or an MMLab package (see ``secure_inference._compat_hook``):

* ``install_torchvision_op_schemas``: the PyPI torchvision wheel is a CUDA build whose C++ ops
  cannot load beside CPU torch; torchvision then fails at import with
  ``operator torchvision::nms does not exist``. Declaring the op schemas it registers fake
  kernels for lets the import (models, transforms) succeed; the C++ ops keep raising their
  usual "Couldn't load custom C++ ops" error when called.
* ``install_mmcv_ops_standin``: mmcv-lite ships ``mmcv.ops`` without its compiled ``_ext``;
  mmsegmentation imports ``point_sample`` and ``sigmoid_focal_loss`` from it unconditionally.
  A stand-in module provides a pure-torch ``point_sample`` and raises ``ModuleNotFoundError``
  for every other name (which mmseg's optional imports catch).
* ``allow_mmengine_checkpoint_globals``: mmengine checkpoints hold a few mmengine/numpy
  objects that torch's ``weights_only=True`` loading refuses; they are allow-listed so that
  safe loading stays on for everything else (no global ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``).
"""
from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_applied: dict[str, bool] = {}

# Every op whose fake/autograd kernel torchvision registers at import time.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                 "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward": "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
                           "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
                           "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
                           "bool aligned) -> Tensor",
    "ps_roi_align": "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, "
                    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio) "
                    "-> (Tensor, Tensor)",
    "_ps_roi_align_backward": "_ps_roi_align_backward(Tensor grad, Tensor rois, "
                              "Tensor channel_mapping, float spatial_scale, SymInt pooled_height, "
                              "SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
                              "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool": "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward": "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, "
                          "float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                          "SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
                          "-> Tensor",
    "ps_roi_pool": "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, "
                   "SymInt pooled_height, SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward": "_ps_roi_pool_backward(Tensor grad, Tensor rois, "
                             "Tensor channel_mapping, float spatial_scale, SymInt pooled_height, "
                             "SymInt pooled_width, SymInt batch_size, SymInt channels, "
                             "SymInt height, SymInt width) -> Tensor",
    "deform_conv2d": "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, "
                     "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
                     "SymInt dilation_h, SymInt dilation_w, SymInt groups, "
                     "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward": "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, "
                               "Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
                               "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
                               "SymInt dilation_w, SymInt groups, SymInt offset_groups, "
                               "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
_torchvision_lib = None  # keeps the schema library alive for the process lifetime


def torchvision_ops_loadable() -> bool:
    """True when torchvision's compiled ops library loads in this process (or is absent)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    import torch
    candidates = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, ImportError, RuntimeError):
        return False
    return True


def install_torchvision_op_schemas() -> bool:
    """Declare torchvision's op schemas when its C++ ops cannot load. Returns True if applied."""
    global _torchvision_lib
    if _torchvision_lib is not None or "torchvision" in sys.modules or torchvision_ops_loadable():
        return False
    import torch
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS.values():
        lib.define(schema)
    _torchvision_lib = lib
    return True


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False,
                 **kwargs) -> torch.Tensor:
    """Pure-torch ``mmcv.ops.point_sample``: sample ``input`` at normalised [0, 1] ``points``."""
    import torch
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    out = torch.nn.functional.grid_sample(input, 2.0 * points - 1.0,
                                          align_corners=align_corners, **kwargs)
    return out.squeeze(3) if add_dim else out


def _missing_sigmoid_focal_loss(*args, **kwargs):
    raise RuntimeError("mmcv.ops.sigmoid_focal_loss needs mmcv's compiled ops, which mmcv-lite "
                       "lacks; mmseg's FocalLoss uses its pure-torch version on CPU.")


def _make_mmcv_ops_standin() -> types.ModuleType:
    module = types.ModuleType("mmcv.ops")
    module.__doc__ = "secure_inference stand-in for mmcv.ops (mmcv-lite has no compiled ops)."
    module.point_sample = point_sample
    module.sigmoid_focal_loss = _missing_sigmoid_focal_loss
    module.__secure_inference_standin__ = True

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(
            f"mmcv.ops.{name} needs mmcv's compiled ops; install full mmcv to use it "
            "(mmcv-lite provides only the pure-torch stand-ins point_sample).")

    module.__getattr__ = __getattr__
    return module


def mmcv_ops_available() -> bool:
    """True when the compiled ``mmcv._ext`` extension is importable."""
    if importlib.util.find_spec("mmcv") is None:
        return True  # nothing to patch
    try:   # finding mmcv._ext imports mmcv, which fails without mmengine
        return importlib.util.find_spec("mmcv._ext") is not None
    except ImportError:
        return True  # mmcv cannot load at all: nothing to patch, its own error comes later


def install_mmcv_ops_standin() -> bool:
    """Register the ``mmcv.ops`` stand-in when compiled mmcv ops are absent."""
    if mmcv_ops_available():
        return False
    existing = sys.modules.get("mmcv.ops")
    if existing is not None and not getattr(existing, "__secure_inference_standin__", False):
        return False  # a real (importable) mmcv.ops is already loaded
    module = _make_mmcv_ops_standin()
    sys.modules["mmcv.ops"] = module
    if "mmcv" in sys.modules:
        sys.modules["mmcv"].ops = module
    return True


def _statistics_getattr(obj, name: str):
    """``getattr`` limited to HistoryBuffer's statistics methods (all an mmengine checkpoint needs).

    A general ``getattr`` in the safe unpickler would let a hostile checkpoint reach arbitrary
    methods of allow-listed objects (e.g. ``ndarray.tofile``), so anything else is refused.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    # the defaults are registered lazily (at the first HistoryBuffer()), so name them here too
    allowed = {"min", "max", "current", "mean"} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) in a checkpoint")


def allow_mmengine_checkpoint_globals() -> list[str]:
    """Allow-list the mmengine/numpy objects found in mmengine checkpoints for safe loading."""
    import numpy as np
    import torch

    allowed: list = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
        allowed += [_reconstruct, scalar]
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
        allowed += [_reconstruct, scalar]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
        allowed.append(HistoryBuffer)
        # HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, 'min') etc.
        allowed.append((_statistics_getattr, "builtins.getattr"))
        allowed.append((_statistics_getattr, "__builtin__.getattr"))
    except ImportError:
        pass
    try:
        from mmengine.config.config import ConfigDict
        allowed.append(ConfigDict)
    except ImportError:
        pass
    torch.serialization.add_safe_globals(allowed)
    return [getattr(a, "__qualname__", str(a)) for a in allowed]


def apply_all() -> dict[str, bool]:
    """Apply every needed fix once per process; returns which ones were applied."""
    import torch  # noqa: F401  (first: importing torch can itself apply the fixes, see _compat_hook)
    if not _applied:
        _applied["torchvision_op_schemas"] = install_torchvision_op_schemas()
        _applied["mmcv_ops_standin"] = install_mmcv_ops_standin()
        _applied["mmengine_safe_globals"] = bool(allow_mmengine_checkpoint_globals())
    return dict(_applied)
