"""Block-ReLU: one sign decision (one DReLU in secure inference) per h×w patch of a channel.

Per channel ``c`` of a site the block size ``[h, w]`` means:

* ``[1, 1]``: ordinary ReLU;
* ``[0, 1]`` (any row with a zero): identity, no ReLU and no DReLU;
* ``[h, w]``: the map is tiled from the top-left into non-overlapping h×w patches (edge patches
  are partial); a patch is kept unchanged iff the mean of its valid pixels is > 0, else zeroed.

The forward is ``x * mask`` with the mask computed without gradient, so the gradient flows
straight through the mask (exactly as ReLU's gradient does for ``[1, 1]``).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import nn

IDENTITY = (0, 1)


INT32_MAX = int(np.iinfo(np.int32).max)


def as_block_sizes(block_sizes, channels: int | None = None) -> np.ndarray:
    """Validate and return block sizes as an int32 array of shape [C, 2].

    Every value must be an integer (integral floats are accepted) in ``[0, INT32_MAX]``: a
    larger value would wrap when cast to int32 (2**32 + 2 became 2), silently changing the
    network, so it is refused with the channel and the value instead.
    """
    arr = np.asarray(block_sizes.detach().cpu() if torch.is_tensor(block_sizes) else block_sizes)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"block sizes must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"block sizes must have shape [C, 2], got {list(arr.shape)}")
    if channels is not None and arr.shape[0] != channels:
        raise ValueError(f"block sizes have {arr.shape[0]} rows but the site has {channels} channels")
    # compared in the array's own dtype (no cast that could wrap); NaN and inf fail both tests
    bad = ~((arr >= 0) & (arr <= INT32_MAX))
    if arr.dtype.kind == "f":
        bad |= arr != np.round(arr)
    if bad.any():
        c, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"channel {c} has block size {arr[c, j].item()!r} (row {arr[c].tolist()}); "
                         f"block sizes must be integers >= 0 and <= {INT32_MAX} "
                         "([0, 1] marks identity)")
    return arr.astype(np.int32)


def is_identity(h: int, w: int) -> bool:
    """True for the identity marker (a zero in either dimension)."""
    return h == 0 or w == 0


def block_cost(h: int, w: int, height: int, width: int) -> int:
    """DReLUs one channel of an H×W map costs with block size [h, w] (0 for identity)."""
    if is_identity(h, w):
        return 0
    return math.ceil(height / h) * math.ceil(width / w)


def block_costs(block_sizes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Vectorised :func:`block_cost` over rows of a [K, 2] array; returns int64 [K]."""
    sizes = np.asarray(block_sizes, dtype=np.int64).reshape(-1, 2)
    h, w = sizes[:, 0], sizes[:, 1]
    ident = (h == 0) | (w == 0)
    hs, ws = np.where(ident, 1, h), np.where(ident, 1, w)
    costs = (-(-height // hs)) * (-(-width // ws))
    return np.where(ident, 0, costs).astype(np.int64)


def block_sign_mask(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-pixel 0/1 mask (dtype of x) of the patches of x [N, C, H, W] whose sum is > 0.

    The mean of a patch's valid pixels is > 0 iff their sum is, so zero padding to a whole
    number of patches does not change any decision. Sums run in float32 for half types.
    """
    n, c, height, width = x.shape
    h, w = min(h, height), min(w, width)
    if h == 1 and w == 1:
        return (x > 0).to(x.dtype)
    ph, pw = -(-height // h), -(-width // w)
    acc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    pad_h, pad_w = ph * h - height, pw * w - width
    if pad_h or pad_w:
        acc = nn.functional.pad(acc, (0, pad_w, 0, pad_h))
    sums = acc.reshape(n, c, ph, h, pw, w).sum(dim=(3, 5))
    keep = (sums > 0).to(x.dtype)
    mask = keep[:, :, :, None, :, None].expand(n, c, ph, h, pw, w).reshape(n, c, ph * h, pw * w)
    return mask[:, :, :height, :width]


class BlockReLU(nn.Module):
    """Block-ReLU over the channels of one activation site.

    ``block_sizes`` is an int array [C, 2] (one row per channel). Channels that share a block
    size are processed together, so the cost depends on the number of distinct sizes, not on C.
    """

    def __init__(self, block_sizes) -> None:
        super().__init__()
        sizes = as_block_sizes(block_sizes)
        self.num_channels = int(sizes.shape[0])
        self.register_buffer("block_sizes", torch.from_numpy(sizes.copy()), persistent=False)
        groups: list[tuple[int, int]] = []
        normalized = np.where((sizes[:, :1] == 0) | (sizes[:, 1:] == 0), np.array(IDENTITY), sizes)
        for key in sorted({tuple(int(v) for v in row) for row in normalized}):
            idx = np.flatnonzero(np.all(normalized == np.array(key), axis=1))
            name = f"_group_{len(groups)}"
            self.register_buffer(name, torch.from_numpy(idx.astype(np.int64)), persistent=False)
            groups.append(key)
        self._groups = groups
        self._all_relu = groups == [(1, 1)]
        self._all_identity = groups == [IDENTITY]

    def groups(self) -> Iterable[tuple[tuple[int, int], torch.Tensor]]:
        """Yields ((h, w), channel indices) for every distinct block size."""
        for i, key in enumerate(self._groups):
            yield key, getattr(self, f"_group_{i}")

    def extra_repr(self) -> str:
        return f"channels={self.num_channels}, sizes={self._groups}"

    @torch.no_grad()
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The 0/1 keep-mask for x [N, C, H, W] (or [N, C]: a site after a Linear layer)."""
        if x.dim() == 2 and x.shape[1] == self.num_channels:
            return self.mask(x[:, :, None, None])[:, :, 0, 0]
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"BlockReLU expects [N, {self.num_channels}, H, W] or "
                             f"[N, {self.num_channels}] input, got {list(x.shape)}")
        if self._all_relu:
            return (x > 0).to(x.dtype)
        mask = torch.ones_like(x)
        for (h, w), idx in self.groups():
            if is_identity(h, w):
                continue
            if len(self._groups) == 1:
                return block_sign_mask(x, h, w)
            mask.index_copy_(1, idx, block_sign_mask(x.index_select(1, idx), h, w))
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._all_identity:
            return x
        return x * self.mask(x)
