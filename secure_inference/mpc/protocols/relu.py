"""ReLU, Block-ReLU, max pooling and SelectShare on secret shares, each built on batched DReLUs.

Every function here is one (or, for max pooling, one per tree level) call of
:func:`~secure_inference.mpc.protocols.drelu.mul_drelu`, which returns shares of
v·DReLU(d) with the multiplication fused into the DReLU's last message (no extra round).
The ``config`` argument (:class:`~secure_inference.mpc.protocols.drelu.DReLUConfig`, default:
the session's, see :func:`~secure_inference.mpc.protocols.drelu.set_default_config`) selects the
exact or an approximate DReLU and is passed to every DReLU a function runs.

* :func:`relu`: ReLU(x) = x·DReLU(x); 3 rounds, :func:`relu_bytes` (199.2 bytes per element
  exact, amortised).
* :func:`block_relu`: the project's Block-ReLU (:class:`secure_inference.BlockReLU`): per
  channel a block size [h, w]; identity channels ([0, 1], any zero) pass unchanged at no cost;
  other channels are tiled from the top-left into h×w patches (partial at the edges). Each
  patch's pixels are summed locally on the shares (zero padding: the sum has the sign of the
  mean of the valid pixels), ONE DReLU per patch decides [sum > 0] (computed as DReLU(sum − 1)
  on the integer fixed-point sum), and the 0/1 decision is multiplied into every pixel of the
  patch. [1, 1] channels are exactly ReLU. Channels are grouped by block size and the whole
  layer is one DReLU call; cost :func:`block_relu_bytes` (24 bytes per non-identity pixel plus
  one DReLU per patch: 43.5 bytes per pixel for 3×3 patches, exact DReLU).
* :func:`block_relu6`: Block-ReLU6 (:class:`secure_inference.BlockReLU6`), the same plan: per
  patch TWO decisions b0 = [S > 0] and b6 = [S > 6·n·2^f] (S the fixed-point patch sum, n its
  valid pixels: the mean against 0 and 6), both in the SAME one DReLU call (3 rounds, the
  rounds of a Block-ReLU), and every pixel x of the patch gets x·b0 + (6 − x)·b6 =
  x·(b0 − b6) + 6·b6 from the same fused multiplication (payloads x and 6·2^f − x, P0 adding
  the public constant). Exact (no truncation); [1, 1] channels are exactly ReLU6. Cost
  :func:`block_relu6_bytes`: ``mul_drelu_bytes(2·patches, 2·pixels)``, i.e. 2 × 175.2 bytes
  per patch plus 48 per non-identity pixel at 64 bits (398.4 per element for [1, 1], the
  bytes of the clamp layer that computes ReLU6 without a spec).
* :func:`max_pool2d`: a tree of comparisons over every window at once: max(a, b) =
  b + (a − b)·DReLU(a − b), ⌈log2 K⌉ levels for K-element windows, 3 rounds each.
* :func:`select_share`: a if d ≥ 0 else b, as b + (a − b)·DReLU(d) (fused, no extra round);
  :func:`select_bit`: SecureNN's SelectShare for an already shared bit (one Beaver
  multiplication from :mod:`.linear`).

With an approximate DReLU the inputs of every DReLU must lie in its valid range: for
Block-ReLU these are patch sums (up to h·w times the pixel magnitude), for max pooling the
differences of two window elements.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...brelu import RELU6_TOP, as_block_sizes, patch_counts
from ..runtime import Party
from ..session import ROLE_CLIENT, ROLE_HELPER
from .linear import mul
from .drelu import EXACT, DReLUConfig, mul_drelu, mul_drelu_bytes, resolve_config

__all__ = ["relu", "relu_bytes", "select_share", "BlockReLUPlan", "block_relu_plan",
           "block_relu", "block_relu_bytes", "block_relu6", "block_relu6_bytes",
           "block_patch_counts", "MaxPoolPlan", "max_pool_plan", "max_pool2d",
           "max_pool_bytes", "max_pool_comparisons", "run_on_shares", "select_bit",
           "adaptive_max_pool_plan", "adaptive_max_pool2d", "adaptive_windows", "max_windows",
           "plan_bytes"]


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_shares(party: Party, *xs: torch.Tensor) -> None:
    if party.role == ROLE_HELPER:
        return
    for x in xs:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise TypeError("shares must be int64 tensors (ring elements of Z_2^64)")


# --------------------------------------------------------------------------------------------
# ReLU and SelectShare
# --------------------------------------------------------------------------------------------

def relu(party: Party, x: torch.Tensor, config: DReLUConfig | None = None, *,
         scope: str = "relu") -> torch.Tensor:
    """Shares of ReLU(x) = x·DReLU(x) for shares ``x`` (P2: placeholder in, placeholder out)."""
    _check_shares(party, x)
    return mul_drelu(party, x, x, None, config, scope=scope)


def relu_bytes(n: int, config: DReLUConfig = EXACT) -> int:
    """Payload bytes (all parties) of :func:`relu` on ``n`` elements."""
    return mul_drelu_bytes(n, n, config)


def select_share(party: Party, d: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 config: DReLUConfig | None = None, *, scope: str = "select") -> torch.Tensor:
    """Shares of ``a`` where d ≥ 0 and ``b`` elsewhere (all three the same shape).

    Computed as b + (a − b)·DReLU(d): one DReLU and 24 bytes per element for the product.
    """
    if _shape(d) != _shape(a) or _shape(a) != _shape(b):
        raise ValueError(f"select_share needs equal shapes, got {list(_shape(d))}, "
                         f"{list(_shape(a))}, {list(_shape(b))}")
    _check_shares(party, d, a, b)
    if party.role == ROLE_HELPER:
        return mul_drelu(party, d, a, None, config, scope=scope)
    return b + mul_drelu(party, d, a - b, None, config, scope=scope)


def select_bit(party: Party, bit: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
               scope: str = "select_bit") -> torch.Tensor:
    """SecureNN's SelectShare: shares of ``a`` where the shared bit is 1 and ``b`` where it is 0.

    ``bit``: shares of 0/1 over Z_2^64 (e.g. from :func:`~.drelu.drelu`), broadcastable to
    a and b. One Beaver multiplication b + bit·(a − b) (:func:`.linear.mul`, no truncation):
    one round, 16 bytes per element of a plus 16 per bit plus 8 per element for the triple.
    Prefer :func:`select_share` when the bit is a fresh DReLU: it needs no extra round.
    """
    _check_shares(party, bit, a, b)
    if party.role == ROLE_HELPER:
        return mul(party, bit, a, truncate=False, scope=scope)
    return b + mul(party, bit, a - b, truncate=False, scope=scope)


# --------------------------------------------------------------------------------------------
# Block-ReLU
# --------------------------------------------------------------------------------------------

@dataclass
class BlockReLUPlan:
    """Public structure of one Block-ReLU layer: channel groups, patch counts, pixel→patch map.

    ``groups``: (h, w, channel indices) per distinct non-identity block size (h, w clipped to
    the map); ``identity``: channels left unchanged; ``decisions``: DReLUs of the layer;
    ``pixels``: non-identity pixels (payload values); ``index``: for each payload pixel (groups
    concatenated, each flattened as [N, C_g, H, W]) the patch (DReLU) it belongs to.
    """

    shape: tuple[int, int, int, int]
    groups: list[tuple[int, int, torch.Tensor]]
    identity: torch.Tensor
    decisions: int
    pixels: int
    index: torch.Tensor


def block_relu_plan(shape, block_sizes, device: torch.device | str = "cpu") -> BlockReLUPlan:
    """The :class:`BlockReLUPlan` for an [N, C, H, W] input and block sizes [C, 2] (an [N, C]
    input, a site after a Linear layer, is planned as [N, C, 1, 1])."""
    if len(shape) == 2:
        shape = tuple(shape) + (1, 1)
    if len(shape) != 4:
        raise ValueError(f"Block-ReLU expects an [N, C, H, W] input, got shape {list(shape)}")
    nb, ch, height, width = (int(s) for s in shape)
    sizes = as_block_sizes(block_sizes, channels=ch)
    ident = (sizes[:, 0] == 0) | (sizes[:, 1] == 0)
    groups: list[tuple[int, int, torch.Tensor]] = []
    index_parts: list[torch.Tensor] = []
    decisions = pixels = 0
    keyed = np.where(ident[:, None], 0, np.minimum(sizes, [max(height, 1), max(width, 1)]))
    for key in sorted({(int(a), int(b)) for a, b in keyed[~ident]}):
        h, w = key
        idx = np.flatnonzero(np.all(keyed == np.array(key), axis=1) & ~ident)
        cg = idx.size
        ph, pw = -(-height // h), -(-width // w)
        rows = (torch.arange(height, device=device) // h).view(1, height, 1) * pw
        cols = (torch.arange(width, device=device) // w).view(1, 1, width)
        planes = torch.arange(nb * cg, device=device).view(-1, 1, 1) * (ph * pw)
        index_parts.append((planes + rows + cols).reshape(-1) + decisions)
        groups.append((h, w, torch.from_numpy(idx.astype(np.int64)).to(device)))
        decisions += nb * cg * ph * pw
        pixels += nb * cg * height * width
    index = torch.cat(index_parts) if index_parts else torch.zeros(0, dtype=torch.int64,
                                                                   device=device)
    identity = torch.from_numpy(np.flatnonzero(ident).astype(np.int64)).to(device)
    return BlockReLUPlan((nb, ch, height, width), groups, identity, decisions, pixels, index)


def block_relu_bytes(shape, block_sizes, config: DReLUConfig = EXACT) -> int:
    """Payload bytes (all parties) of :func:`block_relu` on an input of ``shape``."""
    plan = block_relu_plan(shape, block_sizes)
    return mul_drelu_bytes(plan.decisions, plan.pixels, config)


def _patch_sums(x: torch.Tensor, plan: BlockReLUPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch sums, payload pixels) of shares ``x`` in the plan's order (local: no messages;
    zero padding adds nothing to a sum)."""
    n = plan.shape[0]
    sums, payload = [], []
    for h, w, idx in plan.groups:
        xs = x.index_select(1, idx)
        height, width = xs.shape[2], xs.shape[3]
        ph, pw = -(-height // h), -(-width // w)
        padded = F.pad(xs, (0, pw * w - width, 0, ph * h - height)) if (ph * h != height or
                                                                         pw * w != width) else xs
        sums.append(padded.reshape(n, idx.numel(), ph, h, pw, w).sum(dim=(3, 5)).reshape(-1))
        payload.append(xs.reshape(-1))
    return torch.cat(sums), torch.cat(payload)


def _place(x: torch.Tensor, values: torch.Tensor, plan: BlockReLUPlan) -> torch.Tensor:
    """``x`` with the non-identity channels replaced by ``values`` (the plan's payload order)."""
    n = plan.shape[0]
    out = x.clone()
    start = 0
    for h, w, idx in plan.groups:
        size = n * idx.numel() * plan.shape[2] * plan.shape[3]
        out.index_copy_(1, idx, values[start:start + size].view(n, idx.numel(), *plan.shape[2:]))
        start += size
    return out


def _flat_as_maps(protocol: Callable) -> Callable:
    """A Block-ReLU(6) protocol on [N, C, H, W] shares that also takes [N, C] shares (after a
    Linear layer: one pixel per channel), as [N, C, 1, 1] maps."""
    @functools.wraps(protocol)
    def run(party: Party, x: torch.Tensor, block_sizes, config: DReLUConfig | None = None,
            **kw) -> torch.Tensor:
        _check_shares(party, x)
        if len(_shape(x)) != 2:
            return protocol(party, x, block_sizes, config, **kw)
        flat = x.reshape(*_shape(x), 1, 1)
        return protocol(party, flat, block_sizes, config, **kw).reshape(_shape(x))
    return run


def block_patch_counts(plan: BlockReLUPlan) -> torch.Tensor:
    """Valid pixels of every patch (decision) of the plan, int64 [decisions] in its order."""
    nb, _, height, width = plan.shape
    parts = [patch_counts(height, width, h, w).reshape(1, -1).expand(nb * idx.numel(), -1)
             .reshape(-1) for h, w, idx in plan.groups]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@_flat_as_maps
def block_relu(party: Party, x: torch.Tensor, block_sizes, config: DReLUConfig | None = None,
               *, scope: str = "block_relu") -> torch.Tensor:
    """Shares of BlockReLU(block_sizes)(x) for shares ``x`` [N, C, H, W] (P2: placeholders).

    Semantics and cost in the module docstring; one DReLU call for the whole layer. An
    [N, C] input (after a Linear layer) is one pixel per channel.
    """
    _check_shares(party, x)
    plan = block_relu_plan(_shape(x), block_sizes, device="cpu" if x.device.type == "meta"
                           else x.device)
    cfg = resolve_config(party, config)
    if party.role == ROLE_HELPER:
        if plan.decisions:
            mul_drelu(party, party.placeholder((plan.decisions,)),
                      party.placeholder((plan.pixels,)), plan.index, cfg, scope=scope)
        return party.placeholder(plan.shape)
    if not plan.decisions:
        return x.clone()
    d, payload = _patch_sums(x, plan)
    if party.role == ROLE_CLIENT:
        d = d - 1  # DReLU(sum − 1) = [sum > 0] on integer sums: the plaintext's strict test
    return _place(x, mul_drelu(party, d, payload, plan.index, cfg, scope=scope), plan)


def block_relu6_bytes(shape, block_sizes, config: DReLUConfig = EXACT) -> int:
    """Payload bytes (all parties) of :func:`block_relu6` on an input of ``shape``: two
    decisions per patch and two payload values per non-identity pixel, one DReLU call."""
    plan = block_relu_plan(shape, block_sizes)
    return mul_drelu_bytes(2 * plan.decisions, 2 * plan.pixels, config)


@_flat_as_maps
def block_relu6(party: Party, x: torch.Tensor, block_sizes, config: DReLUConfig | None = None,
                *, scope: str = "block_relu6") -> torch.Tensor:
    """Shares of BlockReLU6(block_sizes)(x) for shares ``x`` [N, C, H, W] or [N, C] (P2:
    placeholders): the patch sums S compared with 0 and with 6·n·2^f in one DReLU call, the
    pixels multiplied by both bits in its fused multiplication (module docstring)."""
    _check_shares(party, x)
    plan = block_relu_plan(_shape(x), block_sizes, device="cpu" if x.device.type == "meta"
                           else x.device)
    cfg = resolve_config(party, config)
    # decisions [b0 of every patch; b6 of every patch], payload [x; 6 − x]
    index = torch.cat([plan.index, plan.index + plan.decisions])
    if party.role == ROLE_HELPER:
        if plan.decisions:
            mul_drelu(party, party.placeholder((2 * plan.decisions,)),
                      party.placeholder((2 * plan.pixels,)), index, cfg, scope=scope)
        return party.placeholder(plan.shape)
    if not plan.decisions:
        return x.clone()
    sums, payload = _patch_sums(x, plan)
    d = torch.cat([sums, sums])
    v = torch.cat([payload, -payload])
    if party.role == ROLE_CLIENT:   # the public constants: one party adds them
        six = int(RELU6_TOP) << party.frac_bits
        limit = six * block_patch_counts(plan).to(d.device)
        d = d - 1                   # [S > t] = DReLU(S − t − 1) on integers
        d[plan.decisions:] -= limit
        v[plan.pixels:] += six
    prod = mul_drelu(party, d, v, index, cfg, scope=scope)
    return _place(x, prod[:plan.pixels] + prod[plan.pixels:], plan)


# --------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------

def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t


@dataclass
class MaxPoolPlan:
    """Public structure of a max pooling: per window element (K of them) and output position the
    flat input position it reads (padding positions replaced by a valid element of the same
    window, which leaves the maximum unchanged), and the comparisons per tree level."""

    out_shape: tuple[int, int, int, int]
    gather: torch.Tensor          # [K, Hout·Wout] flat indices into H·W
    levels: list[int]             # comparisons per (N·C·Hout·Wout) at each level


def max_pool_plan(shape, kernel_size, stride=None, padding=0,
                  device: torch.device | str = "cpu", ceil_mode: bool = False) -> MaxPoolPlan:
    """The :class:`MaxPoolPlan` of ``torch.nn.functional.max_pool2d`` with these arguments
    (``ceil_mode`` as torch: a last, partial window where it starts inside the input or its
    left padding; its positions past the input read a valid element of that window)."""
    if len(shape) != 4:
        raise ValueError(f"max pooling expects an [N, C, H, W] input, got shape {list(shape)}")
    nb, ch, height, width = (int(s) for s in shape)
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(kernel_size if stride is None else stride, "stride")
    ph, pw = _pair(padding, "padding")
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError("kernel and stride must be >= 1 and padding >= 0")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding {ph, pw} must be at most half the kernel {kh, kw} "
                         "(as in torch.nn.functional.max_pool2d)")
    hout = _pool_out(height, kh, sh, ph, ceil_mode)
    wout = _pool_out(width, kw, sw, pw, ceil_mode)
    if hout < 1 or wout < 1:
        raise ValueError(f"kernel {kh, kw} does not fit the padded {height}x{width} input")
    oy = torch.arange(hout, device=device).view(1, hout) * sh - ph
    ox = torch.arange(wout, device=device).view(1, wout) * sw - pw
    # a clamped padding (or ceil-mode overhang) position is in the same window
    rows = (oy + torch.arange(kh, device=device).view(kh, 1)).clamp(0, height - 1)
    cols = (ox + torch.arange(kw, device=device).view(kw, 1)).clamp(0, width - 1)
    return _windows_plan((nb, ch, hout, wout), rows, cols, width)


def _pool_out(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """torch's pooling output length (with its ceil-mode rule: no window starts in the right
    padding)."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _windows_plan(out_shape, rows: torch.Tensor, cols: torch.Tensor, width: int
                  ) -> MaxPoolPlan:
    """The plan of a max over separable windows: ``rows`` [kh, Hout] and ``cols`` [kw, Wout]
    the input row/column each window element reads (every entry inside its window)."""
    kh, kw = rows.shape[0], cols.shape[0]
    gather = (rows.view(kh, 1, -1, 1) * width + cols.view(1, kw, 1, -1))
    return MaxPoolPlan(tuple(out_shape), gather.reshape(kh * kw, -1),
                       max_pool_comparisons(kh * kw))


def adaptive_windows(size: int, out: int) -> tuple[list[int], list[int]]:
    """torch's adaptive pooling windows along one axis: starts ⌊i·size/out⌋ and ends
    ⌈(i+1)·size/out⌉ (windows may overlap or, when out > size, repeat)."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    return starts, ends


def adaptive_max_pool_plan(shape, output_size, device: torch.device | str = "cpu"
                           ) -> MaxPoolPlan:
    """The :class:`MaxPoolPlan` of ``F.adaptive_max_pool2d(x, output_size)``: every window
    padded to the largest window's size by repeating its last element (the max is unchanged)."""
    if len(shape) != 4:
        raise ValueError(f"max pooling expects an [N, C, H, W] input, got shape {list(shape)}")
    nb, ch, height, width = (int(s) for s in shape)
    hout, wout = _pair(output_size, "output_size")
    if min(hout, wout) < 1:
        raise ValueError(f"output size must be positive, got {output_size!r}")
    axes = []
    for size, out in ((height, hout), (width, wout)):
        starts, ends = adaptive_windows(size, out)
        k = max(e - s for s, e in zip(starts, ends))
        st = torch.tensor(starts, device=device).view(1, out)
        en = torch.tensor(ends, device=device).view(1, out)
        axes.append(torch.minimum(st + torch.arange(k, device=device).view(k, 1), en - 1))
    return _windows_plan((nb, ch, hout, wout), axes[0], axes[1], width)


def max_pool_comparisons(window: int) -> list[int]:
    """Comparisons per output value at each level of the max tree over ``window`` elements:
    each level pairs up half the remaining candidates (⌈log2 window⌉ levels, window − 1 in
    all)."""
    levels, k = [], int(window)
    while k > 1:
        levels.append(k // 2)
        k = k - k // 2
    return levels


def max_pool_bytes(shape, kernel_size, stride=None, padding=0,
                   config: DReLUConfig = EXACT, ceil_mode: bool = False) -> int:
    """Payload bytes (all parties) of :func:`max_pool2d`."""
    return plan_bytes(max_pool_plan(shape, kernel_size, stride, padding, ceil_mode=ceil_mode),
                      config)


def plan_bytes(plan: MaxPoolPlan, config: DReLUConfig = EXACT) -> int:
    """Payload bytes (all parties) of :func:`max_windows` with ``plan``."""
    per = math.prod(plan.out_shape)
    return sum(mul_drelu_bytes(c * per, c * per, config) for c in plan.levels)


def max_pool2d(party: Party, x: torch.Tensor, kernel_size, stride=None, padding=0,
               config: DReLUConfig | None = None, *, scope: str = "max_pool",
               ceil_mode: bool = False) -> torch.Tensor:
    """Shares of ``max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)`` by a
    tree of comparisons.

    All windows are compared at once: ⌈log2 K⌉ levels (K = kernel area), each one batched
    max(a, b) = b + ReLU(a − b) over half the remaining candidates. P2: placeholders.
    """
    _check_shares(party, x)
    plan = max_pool_plan(_shape(x), kernel_size, stride, padding,
                         device="cpu" if x.device.type == "meta" else x.device,
                         ceil_mode=ceil_mode)
    return max_windows(party, x, plan, config, scope=scope)


def adaptive_max_pool2d(party: Party, x: torch.Tensor, output_size,
                        config: DReLUConfig | None = None, *, scope: str = "max_pool"
                        ) -> torch.Tensor:
    """Shares of ``F.adaptive_max_pool2d(x, output_size)`` (any output size: public, possibly
    overlapping windows) with the comparison tree of :func:`max_pool2d`."""
    _check_shares(party, x)
    plan = adaptive_max_pool_plan(_shape(x), output_size,
                                  device="cpu" if x.device.type == "meta" else x.device)
    return max_windows(party, x, plan, config, scope=scope)


def max_windows(party: Party, x: torch.Tensor, plan: MaxPoolPlan,
                config: DReLUConfig | None = None, *, scope: str = "max_pool") -> torch.Tensor:
    """Shares of the max over each window of ``plan`` (an [N, C, H, W] input)."""
    cfg = resolve_config(party, config)
    nb, ch, hout, wout = plan.out_shape
    per = nb * ch * hout * wout
    with party.scope(scope):
        if party.role == ROLE_HELPER:
            for level, c in enumerate(plan.levels):
                ph = party.placeholder((c * per,))
                mul_drelu(party, ph, ph, None, cfg, scope=f"level{level}")
            return party.placeholder(plan.out_shape)
        flat = x.reshape(nb, ch, -1)
        cand = flat[:, :, plan.gather].permute(2, 0, 1, 3).reshape(plan.gather.shape[0], -1)
        for level, c in enumerate(plan.levels):
            a, b = cand[:c], cand[c:2 * c]
            diff = (a - b).reshape(-1)
            best = b + mul_drelu(party, diff, diff, None, cfg, scope=f"level{level}").view(c, -1)
            cand = torch.cat([best, cand[2 * c:]]) if cand.shape[0] > 2 * c else best
        return cand.view(nb, ch, hout, wout)


# --------------------------------------------------------------------------------------------
# Harness helper
# --------------------------------------------------------------------------------------------

def run_on_shares(party: Party, shares: Sequence[torch.Tensor],
                  ops: Sequence[tuple[Callable[..., Any], dict[str, Any]]]
                  ) -> tuple[list[Any], Any, list[float]]:
    """Apply each ``op(party, x, **kwargs)`` of ``ops`` to this party's share of x; return
    (results, party.stats, wall seconds per op on this party); P2's results are None.

    ``shares`` = (x0, x1), moved to the party's device; P2 gets a placeholder of the same
    shape. Results come back on the CPU (seconds include the device's kernels). Picklable when the ops are
    library functions, so ``functools.partial(run_on_shares, shares=..., ops=...)`` is a body for
    :func:`~secure_inference.mpc.harness.run_local_processes` (used by tests and benchmarks).
    """
    if len(shares) != 2 or tuple(shares[0].shape) != tuple(shares[1].shape):
        raise ValueError("shares must be the two parties' tensors of one shape")
    x = (shares[party.role].to(party.device) if party.role != ROLE_HELPER
         else party.placeholder(shares[0].shape))
    results, seconds = [], []
    for op, kwargs in ops:
        start = time.perf_counter()
        out = op(party, x, **kwargs)
        if torch.is_tensor(out) and out.device.type == "cuda":
            torch.cuda.synchronize(out.device)   # the op's time includes its kernels
        seconds.append(time.perf_counter() - start)
        results.append(None if party.role == ROLE_HELPER
                       else out.cpu() if torch.is_tensor(out) else out)
    return results, party.stats, seconds
