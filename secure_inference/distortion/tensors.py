"""Tensor utilities of the distortion engines: model outputs as matrices, Block-ReLU of a whole
map, row selection, NHWC conversion, finiteness checks and sample batching."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..brelu import RELU, RELU6_TOP, block_relu6_masks, block_sign_mask, is_identity
from .base import DistortionError


def _tree_map(fn, obj):
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts (other leaves unchanged)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_tree_map(fn, o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _tree_map(fn, v)) for k, v in obj.items())
    return obj


def output_matrix(out) -> torch.Tensor:
    """The model output as a [B, D] float tensor (nested outputs are flattened and joined)."""
    parts: list[torch.Tensor] = []
    _tree_map(lambda t: parts.append(t), out)
    if not parts:
        raise DistortionError(f"the model returned {type(out).__name__} without tensors; "
                              "distortion needs a tensor output (logits)")
    b = parts[0].shape[0]
    return torch.cat([p.reshape(b, -1).float() for p in parts], dim=1)


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """[N, C] activations (after linear layers) as [N, C, 1, 1]; 4-D tensors unchanged."""
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() != 4:
        raise DistortionError(f"activation of shape {list(t.shape)} is neither [N, C, H, W] "
                              "nor [N, C]")
    return t


def block_relu_all(x: torch.Tensor, size: Sequence[int], activation: str = RELU
                   ) -> torch.Tensor:
    """Block-ReLU (``activation`` 'relu') or Block-ReLU6 ('relu6') of size ``size`` applied
    to every channel of x [N, C, H, W]."""
    h, w = int(size[0]), int(size[1])
    if is_identity(h, w):
        return x.clone()
    if activation == RELU:
        return x * block_sign_mask(x, h, w)
    keep, top = block_relu6_masks(x, h, w)
    return x * keep + RELU6_TOP * top


def take_rows(t: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``t[rows]`` along dim 0, as a new tensor in t's memory format (channels_last kept).

    On CPU this goes through ``numpy.take``: torch's multi-threaded gathers (index_select,
    stack) were 10-100x slower on a busy 2-core machine.
    """
    if _is_channels_last(t):  # gather the NHWC view, hand back the NCHW-shaped view of it
        return take_rows(t.permute(0, 2, 3, 1), rows).permute(0, 3, 1, 2)
    if t.device.type == "cpu" and not t.requires_grad and t.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.take(t.contiguous().numpy(), list(rows), axis=0))
    return t.index_select(0, torch.as_tensor(list(rows), dtype=torch.long, device=t.device))


def _is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor stored NHWC (and not also plainly contiguous, e.g. C == 1)."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def to_channels_last(obj):
    """Every 4-D tensor in ``obj`` (nested) stored NHWC: oneDNN's convolutions run 1.3-1.6x
    faster on CPU with NHWC activations than with NCHW ones, and the format propagates."""
    return _tree_map(lambda t: t.contiguous(memory_format=torch.channels_last)
                     if t.dim() == 4 else t, obj)


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32,
                 torch.uint8, torch.bool)


def check_finite(y: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(y).all()):
        raise DistortionError(f"{what} contains NaN/inf values; check the checkpoint and the "
                              "input normalisation (samples must be the model's real inputs)")


def iter_batches(samples, batch_size: int | None) -> list[torch.Tensor]:
    """Samples as a list of [n, C, H, W] batches (a tensor is split into ``batch_size`` rows)."""
    if torch.is_tensor(samples):
        if samples.dim() != 4:
            raise DistortionError(f"samples must be [N, C, H, W], got {list(samples.shape)}")
        if samples.shape[0] == 0:
            raise DistortionError("no samples given")
        bs = int(batch_size or samples.shape[0])
        return list(samples.split(bs))
    batches = [b for b in samples]
    if not batches:
        raise DistortionError("no samples given")
    for b in batches:
        if not torch.is_tensor(b) or b.dim() != 4:
            raise DistortionError("samples must be a tensor [N, C, H, W] or an iterable of "
                                  "such tensors")
    return batches
