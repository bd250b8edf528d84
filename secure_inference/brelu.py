"""Block-ReLU and Block-ReLU6: one sign decision per h×w patch of a channel (one DReLU in
secure inference for Block-ReLU, two for Block-ReLU6).

Per channel ``c`` of a site the block size ``[h, w]`` means:

* ``[1, 1]``: the ordinary activation (ReLU, or ReLU6 for :class:`BlockReLU6`);
* ``[0, 1]`` (any row with a zero): identity, the input passes unchanged (no ReLU, no clip,
  no DReLU);
* ``[h, w]``: the map is tiled from the top-left into non-overlapping h×w patches (edge patches
  are partial); m is the mean of a patch's valid pixels (zero padding leaves every decision
  unchanged: the sum is compared, against 0 or 6 × the number of valid pixels).

  - Block-ReLU: the patch is kept unchanged iff m > 0, else zeroed.
  - Block-ReLU6: with b0 = [m > 0] and b6 = [m > 6] (b6 implies b0), every pixel x of the
    patch becomes x·(b0 − b6) + 6·b6: kept where 0 < m ≤ 6, zeroed where m ≤ 0, set to 6
    where m > 6. A [1, 1] channel is exactly ReLU6.

The forward is ``x * mask`` (Block-ReLU6: ``x * pass + 6 * top``) with the masks computed
without gradient, so the gradient flows straight through the mask (exactly as ReLU's and
ReLU6's gradients do for ``[1, 1]``).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import nn

IDENTITY = (0, 1)

RELU, RELU6 = "relu", "relu6"
"""The activations a site can have: a site of ReLU becomes a :class:`BlockReLU`, a site of
ReLU6 a :class:`BlockReLU6`."""
RELU6_TOP = 6.0
"""ReLU6's upper bound (the value of a Block-ReLU6 patch whose mean is above it)."""


def drelus_per_patch(activation: str = RELU) -> int:
    """Comparisons one patch costs: 1 for Block-ReLU (m > 0), 2 for Block-ReLU6 (m > 0, m > 6)."""
    if activation == RELU:
        return 1
    if activation == RELU6:
        return 2
    raise ValueError(f"unknown activation {activation!r}; expected {RELU!r} or {RELU6!r}")


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
    """Patches of one channel of an H×W map with block size [h, w] (0 for identity): its
    DReLUs under Block-ReLU (Block-ReLU6: :func:`drelus_per_patch` times as many)."""
    if is_identity(h, w):
        return 0
    return math.ceil(height / h) * math.ceil(width / w)


def block_costs(block_sizes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Vectorised :func:`block_cost` over rows of a [K, 2] array; returns int64 [K] (patches)."""
    sizes = np.asarray(block_sizes, dtype=np.int64).reshape(-1, 2)
    h, w = sizes[:, 0], sizes[:, 1]
    ident = (h == 0) | (w == 0)
    hs, ws = np.where(ident, 1, h), np.where(ident, 1, w)
    costs = (-(-height // hs)) * (-(-width // ws))
    return np.where(ident, 0, costs).astype(np.int64)


def _patch_sums(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sums [N, C, ph, pw] of the zero-padded h×w patches of x (float32 for half types)."""
    n, c, height, width = x.shape
    ph, pw = -(-height // h), -(-width // w)
    acc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    pad_h, pad_w = ph * h - height, pw * w - width
    if pad_h or pad_w:
        acc = nn.functional.pad(acc, (0, pad_w, 0, pad_h))
    return acc.reshape(n, c, ph, h, pw, w).sum(dim=(3, 5))


def _expand(per_patch: torch.Tensor, h: int, w: int, height: int, width: int) -> torch.Tensor:
    """Per-patch values [N, C, ph, pw] broadcast to the pixels of their patches [N, C, H, W]."""
    n, c, ph, pw = per_patch.shape
    full = per_patch[:, :, :, None, :, None].expand(n, c, ph, h, pw, w)
    return full.reshape(n, c, ph * h, pw * w)[:, :, :height, :width]


def patch_counts(height: int, width: int, h: int, w: int) -> torch.Tensor:
    """Valid pixels of every h×w patch of an H×W map, [ph, pw] int64 (edge patches partial)."""
    rows = torch.clamp(height - torch.arange(0, height, h), max=h)
    cols = torch.clamp(width - torch.arange(0, width, w), max=w)
    return rows[:, None] * cols[None, :]


def block_sign_mask(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-pixel 0/1 mask (dtype of x) of the patches of x [N, C, H, W] whose sum is > 0.

    The mean of a patch's valid pixels is > 0 iff their sum is, so zero padding to a whole
    number of patches does not change any decision. Sums run in float32 for half types.
    """
    height, width = x.shape[2], x.shape[3]
    h, w = min(h, height), min(w, width)
    if h == 1 and w == 1:
        return (x > 0).to(x.dtype)
    sums = _patch_sums(x, h, w)
    return _expand((sums > 0).to(x.dtype), h, w, height, width)


def block_relu6_masks(x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel 0/1 masks (pass, top) (dtype of x) of Block-ReLU6 on x [N, C, H, W]:
    pass = b0 − b6 (the pixel passes), top = b6 (the pixel becomes 6), with b0 = [m > 0] and
    b6 = [m > 6] for m the mean of the patch's valid pixels (compared as sum > 6·count)."""
    height, width = x.shape[2], x.shape[3]
    h, w = min(h, height), min(w, width)
    if h == 1 and w == 1:
        top = x > RELU6_TOP
        return ((x > 0) & ~top).to(x.dtype), top.to(x.dtype)
    sums = _patch_sums(x, h, w)
    limit = RELU6_TOP * patch_counts(height, width, h, w).to(sums.device, sums.dtype)
    top = sums > limit
    keep = (sums > 0) & ~top
    return (_expand(keep.to(x.dtype), h, w, height, width),
            _expand(top.to(x.dtype), h, w, height, width))


class BlockActivation(nn.Module):
    """What :class:`BlockReLU` and :class:`BlockReLU6` share: the block sizes of one site's
    channels, grouped by size (the cost depends on the number of distinct sizes, not on C)."""

    kind: str = RELU

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

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__} expects [N, {self.num_channels}, H, W] or "
                             f"[N, {self.num_channels}] input, got {list(x.shape)}")

    def _flat(self, x: torch.Tensor) -> bool:
        """Whether x is [N, C] (a site after a Linear layer: one pixel per channel)."""
        return x.dim() == 2 and x.shape[1] == self.num_channels


class BlockReLU(BlockActivation):
    """Block-ReLU over the channels of one activation site.

    ``block_sizes`` is an int array [C, 2] (one row per channel). Channels that share a block
    size are processed together, so the cost depends on the number of distinct sizes, not on C.
    """

    kind = RELU

    @torch.no_grad()
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The 0/1 keep-mask for x [N, C, H, W] (or [N, C]: a site after a Linear layer)."""
        if self._flat(x):
            return self.mask(x[:, :, None, None])[:, :, 0, 0]
        self._check(x)
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


class BlockReLU6(BlockActivation):
    """Block-ReLU6 over the channels of one ReLU6 site (module docstring): ``[1, 1]`` channels
    are ReLU6, identity channels pass unchanged, other patches pass, are zeroed or set to 6 by
    their mean."""

    kind = RELU6

    @torch.no_grad()
    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 0/1 masks (pass, top) for x [N, C, H, W] (or [N, C]); the output is
        x·pass + 6·top."""
        if self._flat(x):
            keep, top = self.masks(x[:, :, None, None])
            return keep[:, :, 0, 0], top[:, :, 0, 0]
        self._check(x)
        keep, top = torch.ones_like(x), torch.zeros_like(x)
        for (h, w), idx in self.groups():
            if is_identity(h, w):
                continue
            if len(self._groups) == 1:
                return block_relu6_masks(x, h, w)
            k, t = block_relu6_masks(x.index_select(1, idx), h, w)
            keep.index_copy_(1, idx, k)
            top.index_copy_(1, idx, t)
        return keep, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._all_identity:
            return x
        keep, top = self.masks(x)
        return x * keep + RELU6_TOP * top


BLOCK_MODULES: dict[str, type[BlockActivation]] = {RELU: BlockReLU, RELU6: BlockReLU6}
"""The block module that replaces a site of each activation."""
