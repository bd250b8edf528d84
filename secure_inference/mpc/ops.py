"""The op table of compiled programs: one class per layer op, holding everything the project
does with that op.

A :class:`~.program.Layer` names its op by a string; :data:`OPS` maps it to an :class:`Op`
whose methods are the op's

* ``run_float``: plaintext float64 execution (the reference the secure run is checked against);
* ``run_secure``: the party's share of the output under secure computation;
* ``drelus``: DReLUs (secure comparisons) it costs for a given output shape;
* ``error_var``: how the fixed-point rounding variance propagates through it (error analysis);
* ``truncated``: the ring values it truncates locally (expected truncation failures);
* ``server_weights`` / ``ring_op``: whether it carries the server's weights, and the exact
  ring product its preprocessing uses.

Adding an op is one subclass registered with :func:`register` (plus, if a torch construct
should compile to it, one rule in the tracer of :mod:`.trace`). ``input`` is special only in
that :func:`~.party.run_party` shares the client's image into it.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..brelu import RELU6_TOP, BlockReLU, BlockReLU6
from .protocols import activations as A
from .protocols import relu as R
from .protocols.linear import (add, add_public, concat, conv2d, conv_op, linear, linear_op, mul,
                               mul_public, prepare_conv, sub, truncate)
from .protocols.pwl import PiecewiseLinear, approximation, clamp_pwl, hardsigmoid_pwl
from .protocols.pooling import avg_pool2d, global_avg_pool2d
from .ring import encode, is_power_of_two, reciprocal_fixed
from .runtime import Party
from .session import ROLE_SERVER
from .settings import DReLUConfig

__all__ = ["Op", "OPS", "register", "op_of", "layer_drelus", "ErrorContext", "public_matrix",
           "WIDTH_ATTR", "DROP_ATTR", "layer_drelu_config"]

WIDTH_ATTR = "drelu_bits"
"""The layer attribute holding a DReLU layer's calibrated comparison width (public, part of the
program and its fingerprint). Absent: the session's DReLU (exact 64-bit by default)."""
DROP_ATTR = "drelu_drop"
"""The layer attribute holding the low bits a calibrated ReLU layer's comparison drops
(:mod:`.dropped_bits`; public, in the fingerprint). Absent: none, exact within the range."""


def layer_drelu_config(layer) -> DReLUConfig | None:
    """The DReLU a layer's comparisons use: its calibrated width (exact within its range, or
    with its dropped low bits), or None for the session default."""
    bits = layer.attrs.get(WIDTH_ATTR)
    if bits is None:
        return None
    drop = int(layer.attrs.get(DROP_ATTR, 0))
    return DReLUConfig(ring_bits=int(bits) - drop, drop_bits=drop)

Tensor = torch.Tensor


class ErrorContext:
    """What the error analysis carries from layer to layer: the fixed point, and the
    Block-ReLU decisions close enough to zero that the secure run may take them the other way
    (layer name, image, channel, patch row, patch column)."""

    def __init__(self, frac_bits: int) -> None:
        self.frac_bits = frac_bits
        self.lsb = 2.0 ** -frac_bits
        self.v_round = self.lsb * self.lsb / 12          # uniform rounding of an encoding
        self.v_trunc = 4 * self.lsb * self.lsb / 3       # local truncation: floor ± 1 lsb
        self.ambiguous: list[tuple[str, int, int, int, int]] = []


class Op:
    """One op of the compiled program (see the module docstring). Subclasses set ``name``."""

    name: ClassVar[str] = ""
    server_weights: ClassVar[bool] = False

    def run_float(self, layer, ins: list[Tensor], weights, flips: Sequence) -> Tensor:
        raise NotImplementedError

    def run_secure(self, party: Party, layer, ins: list[Tensor], weights,
                   pre: dict | None) -> Tensor:
        raise NotImplementedError

    def drelus(self, layer, shape: tuple[int, ...]) -> int:
        """DReLUs this layer costs with output ``shape`` (batch included)."""
        return 0

    def error_var(self, layer, ins: list[Tensor], v_in: list[Tensor], y: Tensor, weights,
                  ctx: ErrorContext) -> Tensor:
        raise NotImplementedError

    def truncated(self, layer, ins: list[Tensor], y: Tensor, weights,
                  frac_bits: int) -> list[Tensor]:
        """The ring values (real value times its scale before the shift) it truncates."""
        return []

    def comparison_inputs(self, layer, ins: list[Tensor]) -> Tensor | None:
        """The values its DReLUs compare with zero (real units; a bound where the protocol's
        own values are not formed in plaintext), or None for an op without DReLUs. The
        calibration records their largest magnitude per layer."""
        return None


OPS: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: add one instance of ``cls`` to :data:`OPS` under ``cls.name``."""
    if not cls.name or cls.name in OPS:
        raise ValueError(f"op name {cls.name!r} is empty or registered twice")
    OPS[cls.name] = cls()
    return cls


def op_of(layer) -> Op:
    """The :class:`Op` of a layer (ValueError naming the layer for an unknown op)."""
    try:
        return OPS[layer.op]
    except KeyError:
        raise ValueError(f"layer '{layer.name}' has an unknown op {layer.op!r}") from None


def layer_drelus(layer, batch: int | None = None) -> int:
    """DReLUs a layer costs for a batch of ``batch`` images (default: compile-time batch)."""
    shape = tuple(layer.shape)
    if batch is not None and shape:
        shape = (int(batch),) + shape[1:]
    return op_of(layer).drelus(layer, shape)


def public_matrix(frac_bits: int, m: Tensor, like: Tensor) -> tuple[Tensor, int]:
    """A public real matrix as ring values: exact integers stay as they are (shift 0), others
    get ``frac_bits`` fractional bits (shift frac_bits)."""
    if bool(torch.all(m == torch.round(m))):
        enc, shift = m.round().to(torch.int64), 0
    else:
        enc, shift = encode(m, frac_bits), frac_bits
    return enc.to("meta" if like.is_meta else like.device), shift


def _shift_bits(value: Tensor, frac_bits: int) -> int:
    return 0 if bool(torch.all(value == torch.round(value))) else frac_bits


# --------------------------------------------------------------------------------------------
# Ops with the server's weights
# --------------------------------------------------------------------------------------------

class _ServerWeightOp(Op):
    server_weights = True

    def ring_op(self, party: Party, layer) -> Callable:
        raise NotImplementedError

    def prepare(self, party: Party, layer, x_shape: Sequence[int]) -> None:
        """Set-up work on this party's opened weight tensor of ``layer`` (once per session,
        after :func:`~.protocols.linear.open_weights`). Nothing by default."""

    def _weights(self, party: Party, layer, weights) -> tuple[Tensor | None, Tensor | None]:
        if party.role != ROLE_SERVER:
            return None, None
        try:
            return weights[layer.name]["weight"], weights[layer.name]["bias"]
        except (KeyError, TypeError):
            raise ValueError(f"the server has no weights for layer '{layer.name}'") from None

    def truncated(self, layer, ins, y, weights, frac_bits):
        return [y * 2.0 ** (2 * frac_bits)]


@register
class Conv2d(_ServerWeightOp):
    name = "conv2d"

    def _geom(self, layer) -> tuple:
        a = layer.attrs
        return a["stride"], a["padding"], a["dilation"], a["groups"]

    def ring_op(self, party, layer):
        return conv_op(party, *self._geom(layer))

    def prepare(self, party, layer, x_shape):
        prepare_conv(party, layer.name, x_shape, *self._geom(layer))

    def run_float(self, layer, ins, weights, flips):
        wt = weights[layer.name]
        return F.conv2d(ins[0], wt["weight"], wt["bias"], *self._geom(layer))

    def run_secure(self, party, layer, ins, weights, pre):
        w, b = self._weights(party, layer, weights)
        a = layer.attrs
        return conv2d(party, ins[0], w, b, weight_shape=a["weight_shape"], stride=a["stride"],
                        padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                        name=layer.name, pre=pre.get(layer.name) if pre else None)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        w = weights[layer.name]["weight"]
        geom = self._geom(layer)
        return (F.conv2d(v_in[0], w * w, None, *geom)
                + F.conv2d(ins[0] * ins[0], torch.full_like(w, ctx.v_round), None, *geom)
                + ctx.v_trunc)


@register
class Linear(_ServerWeightOp):
    name = "linear"

    def ring_op(self, party, layer):
        return linear_op(party)

    def run_float(self, layer, ins, weights, flips):
        wt = weights[layer.name]
        return F.linear(ins[0], wt["weight"], wt["bias"])

    def run_secure(self, party, layer, ins, weights, pre):
        w, b = self._weights(party, layer, weights)
        return linear(party, ins[0], w, b, weight_shape=layer.attrs["weight_shape"],
                        name=layer.name, pre=pre.get(layer.name) if pre else None)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        w = weights[layer.name]["weight"]
        return (F.linear(v_in[0], w * w) + F.linear(ins[0] * ins[0], torch.full_like(w, ctx.v_round))
                + ctx.v_trunc)


# --------------------------------------------------------------------------------------------
# Activations and pooling
# --------------------------------------------------------------------------------------------

@register
class Input(Op):
    name = "input"

    def run_float(self, layer, ins, weights, flips):
        raise RuntimeError("the input layer takes the image; run_float passes it in")

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return torch.full_like(y, ctx.v_round)


@register
class Relu(Op):
    name = "relu"

    def run_float(self, layer, ins, weights, flips):
        return torch.relu(ins[0])

    def run_secure(self, party, layer, ins, weights, pre):
        return R.relu(party, ins[0], layer_drelu_config(layer), scope=layer.name)

    def drelus(self, layer, shape):
        return math.prod(shape)

    def comparison_inputs(self, layer, ins):
        return ins[0]

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        var = v_in[0] * (ins[0] > 0)   # 1-Lipschitz; where the value is cut, no error passes
        drop = int(layer.attrs.get(DROP_ATTR, 0))
        if drop:   # a small positive x may read as negative: error −x, bounded, so var ≤ x²;
            # the secure value differs from x by its own error: the region is widened by 8 σ
            scale = 2.0 ** ctx.frac_bits
            slack = 8 * v_in[0].sqrt()
            u = ins[0] * scale
            near = (u >= -slack * scale) & (u < 2.0 ** drop - 1 + slack * scale)
            var = var + (ins[0].abs() + slack) ** 2 * near
        return var


def _as_maps(x: Tensor) -> Tensor:
    """[N, C] values as [N, C, 1, 1] maps (Block-ReLU after a Linear layer); maps unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


def _on_maps(error_var: Callable) -> Callable:
    """A Block-ReLU(6) error rule written for [N, C, H, W] maps that also takes [N, C] values
    (a site after a Linear layer: one pixel per channel)."""
    @functools.wraps(error_var)
    def rule(self, layer, ins, v_in, y, weights, ctx):
        if ins[0].dim() != 2:
            return error_var(self, layer, ins, v_in, y, weights, ctx)
        return error_var(self, layer, [_as_maps(ins[0])], [_as_maps(v_in[0])], _as_maps(y),
                         weights, ctx).reshape(y.shape)
    return rule


@register
class BlockRelu(Op):
    name = "block_relu"

    def run_float(self, layer, ins, weights, flips):
        sizes = layer.attrs["block_sizes"]
        mask = BlockReLU(sizes).mask(ins[0])
        mine = [f for f in flips if f[0] == layer.name]
        if mine:   # the mask may be an expanded view (one patch per map): write into a copy
            mask = mask.clone()
        for _, n, c, i, j in mine:
            h, w = (int(v) for v in sizes[c])
            h, w = min(h, mask.shape[2]), min(w, mask.shape[3])
            patch = mask[n, c, i * h:(i + 1) * h, j * w:(j + 1) * w]
            patch.copy_(1 - patch)
        return ins[0] * mask

    def run_secure(self, party, layer, ins, weights, pre):
        return R.block_relu(party, ins[0], layer.attrs["block_sizes"], layer_drelu_config(layer),
                            scope=layer.name)

    def drelus(self, layer, shape):
        return R.block_relu_plan(shape, layer.attrs["block_sizes"]).decisions

    def comparison_inputs(self, layer, ins):
        x, sums = _as_maps(ins[0]), []
        for (h, w_), idx in BlockReLU(layer.attrs["block_sizes"]).groups():
            if h == 0 or w_ == 0:
                continue
            xs = x.index_select(1, idx)
            hh, ww = min(h, xs.shape[2]), min(w_, xs.shape[3])
            sums.append(F.avg_pool2d(xs, (hh, ww), (hh, ww), ceil_mode=True,
                                     divisor_override=1).reshape(-1))
        return torch.cat(sums) if sums else x.new_zeros(0)

    @_on_maps
    def error_var(self, layer, ins, v_in, y, weights, ctx):
        x, var = ins[0], v_in[0]
        v = var.clone()
        for (h, w_), idx in BlockReLU(layer.attrs["block_sizes"]).groups():
            if h == 0 or w_ == 0:
                continue
            xs, vs = x.index_select(1, idx), var.index_select(1, idx)
            hh, ww = min(h, xs.shape[2]), min(w_, xs.shape[3])
            kw = dict(kernel_size=(hh, ww), stride=(hh, ww), ceil_mode=True, divisor_override=1)
            s, sv = F.avg_pool2d(xs, **kw), F.avg_pool2d(vs, **kw)
            cnt = F.avg_pool2d(torch.ones_like(xs), **kw)
            if hh * ww > 1:  # a flipped ReLU errs by at most its input's error
                close = (s.abs() <= 8 * sv.sqrt() + cnt * ctx.lsb).nonzero().tolist()
                ctx.ambiguous.extend((layer.name, n, int(idx[c]), i, j) for n, c, i, j in close)
            keep = (s > 0).to(xs.dtype).repeat_interleave(hh, 2).repeat_interleave(ww, 3)
            v.index_copy_(1, idx, vs * keep[:, :, :xs.shape[2], :xs.shape[3]])
        return v


def _patch_sums_and_counts(x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Per-patch sums and valid-pixel counts of x [N, C, H, W] for h×w patches (clipped)."""
    hh, ww = min(h, x.shape[2]), min(w, x.shape[3])
    kw = dict(kernel_size=(hh, ww), stride=(hh, ww), ceil_mode=True, divisor_override=1)
    return F.avg_pool2d(x, **kw), F.avg_pool2d(torch.ones_like(x), **kw)


@register
class BlockRelu6(Op):
    """Block-ReLU6 (:class:`secure_inference.BlockReLU6`): per patch the two comparisons
    [S > 0] and [S > 6·n] in one DReLU call (:func:`.relu.block_relu6`), exact; a flipped
    decision (error analysis) is the one whose threshold the patch's mean is nearer."""

    name = "block_relu6"

    def run_float(self, layer, ins, weights, flips):
        x, sizes = ins[0], layer.attrs["block_sizes"]
        keep, top = BlockReLU6(sizes).masks(x)
        mine = [f for f in flips if f[0] == layer.name]
        if mine:
            keep, top = keep.clone(), top.clone()
        for _, n, c, i, j in mine:
            h, w = (int(v) for v in sizes[c])
            h, w = min(h, x.shape[2]), min(w, x.shape[3])
            at = (n, c, slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w))
            total, count = float(x[at].sum()), x[at].numel()
            k, t = keep[at], top[at]
            if abs(total) <= abs(total - RELU6_TOP * count):   # b0 flips (b6 = 0 here)
                k.copy_(1 - k)
            else:                                 # b6 flips (b0 = 1 here)
                was_top = t.clone()
                t.copy_(1 - was_top)
                k.copy_(was_top)
        return x * keep + RELU6_TOP * top

    def run_secure(self, party, layer, ins, weights, pre):
        return R.block_relu6(party, ins[0], layer.attrs["block_sizes"],
                             layer_drelu_config(layer), scope=layer.name)

    def drelus(self, layer, shape):
        return 2 * R.block_relu_plan(shape, layer.attrs["block_sizes"]).decisions

    def comparison_inputs(self, layer, ins):
        x, parts = _as_maps(ins[0]), []
        for (h, w_), idx in BlockReLU6(layer.attrs["block_sizes"]).groups():
            if h == 0 or w_ == 0:
                continue
            s, cnt = _patch_sums_and_counts(x.index_select(1, idx), h, w_)
            parts += [s.reshape(-1), (s - RELU6_TOP * cnt).reshape(-1)]
        return torch.cat(parts) if parts else x.new_zeros(0)

    @_on_maps
    def error_var(self, layer, ins, v_in, y, weights, ctx):
        x, var = ins[0], v_in[0]
        keep, _ = BlockReLU6(layer.attrs["block_sizes"]).masks(x)
        for (h, w_), idx in BlockReLU6(layer.attrs["block_sizes"]).groups():
            if h == 0 or w_ == 0 or min(h, x.shape[2]) * min(w_, x.shape[3]) == 1:
                continue   # a one-pixel decision flipped errs by at most its input's error
            s, cnt = _patch_sums_and_counts(x.index_select(1, idx), h, w_)
            sv, _ = _patch_sums_and_counts(var.index_select(1, idx), h, w_)
            slack = 8 * sv.sqrt() + cnt * ctx.lsb
            close = ((s.abs() <= slack) | ((s - RELU6_TOP * cnt).abs() <= slack)).nonzero()
            ctx.ambiguous.extend((layer.name, n, int(idx[c]), i, j)
                                 for n, c, i, j in close.tolist())
        return var * keep   # the value 6 is exact; passed pixels carry their error


@register
class MaxPool(Op):
    name = "max_pool"

    def _args(self, layer) -> tuple:
        a = layer.attrs
        return a["kernel_size"], a["stride"], a["padding"]

    @staticmethod
    def _ceil(layer) -> bool:
        return bool(layer.attrs.get("ceil_mode", False))

    def run_float(self, layer, ins, weights, flips):
        return F.max_pool2d(ins[0], *self._args(layer), ceil_mode=self._ceil(layer))

    def run_secure(self, party, layer, ins, weights, pre):
        return R.max_pool2d(party, ins[0], *self._args(layer), layer_drelu_config(layer),
                            scope=layer.name, ceil_mode=self._ceil(layer))

    def drelus(self, layer, shape):
        k = layer.attrs["kernel_size"]
        return sum(R.max_pool_comparisons(k[0] * k[1])) * math.prod(shape)

    def comparison_inputs(self, layer, ins):
        # every comparison of the tree is a − b for a, b in one window: |a − b| ≤ max − min
        # (padding positions repeat a valid element of their window, see max_pool_plan)
        k, st, pad = self._args(layer)
        x, ceil = ins[0], self._ceil(layer)
        hi = F.max_pool2d(x, k, st, pad, ceil_mode=ceil)
        lo = -F.max_pool2d(-x, k, st, pad, ceil_mode=ceil)
        return hi - lo

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        _, arg = F.max_pool2d(ins[0], *self._args(layer), ceil_mode=self._ceil(layer),
                              return_indices=True)
        return v_in[0].flatten(2).gather(2, arg.flatten(2)).reshape(y.shape)


@register
class AdaptiveMaxPool(Op):
    """F.adaptive_max_pool2d to any output size: a max over public, possibly overlapping
    windows (``window``: the largest window, which fixes the comparison tree)."""

    name = "adaptive_max_pool"

    def run_float(self, layer, ins, weights, flips):
        return F.adaptive_max_pool2d(ins[0], layer.attrs["output_size"])

    def run_secure(self, party, layer, ins, weights, pre):
        return R.adaptive_max_pool2d(party, ins[0], layer.attrs["output_size"],
                                     layer_drelu_config(layer), scope=layer.name)

    def drelus(self, layer, shape):
        kh, kw = layer.attrs["window"]
        return sum(R.max_pool_comparisons(kh * kw)) * math.prod(shape)

    def comparison_inputs(self, layer, ins):
        size = layer.attrs["output_size"]
        return F.adaptive_max_pool2d(ins[0], size) + F.adaptive_max_pool2d(-ins[0], size)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        _, arg = F.adaptive_max_pool2d(ins[0], layer.attrs["output_size"], return_indices=True)
        return v_in[0].flatten(2).gather(2, arg.flatten(2)).reshape(y.shape)


class _LocalOp(Op):
    """An op computed locally on each share, in a scope named after the layer."""

    def local(self, party: Party, layer, ins: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def run_secure(self, party, layer, ins, weights, pre):
        with party.scope(layer.name):
            return self.local(party, layer, ins)


class _MeanOp(_LocalOp):
    """Average pooling: a local sum and a public division (truncation, see pooling.py)."""

    def _divisor(self, layer, ins) -> tuple[int, bool]:
        """(the public divisor, whether each window has its own divisor)."""
        raise NotImplementedError

    @staticmethod
    def _with_division(v: Tensor, y: Tensor, ctx: ErrorContext) -> Tensor:
        """The error variance ``v`` of the averaged input plus the division's: the
        reciprocal's rounding (relative 2^-(f+1)) and the truncation."""
        return v + y * y * 2.0 ** -(2 * ctx.frac_bits + 2) + ctx.v_trunc

    def truncated(self, layer, ins, y, weights, frac_bits):
        d, per_window = self._divisor(layer, ins)
        if is_power_of_two(d) and not per_window:
            return [y * d * 2.0 ** frac_bits]
        return [y * 2.0 ** (frac_bits + reciprocal_fixed(d, frac_bits)[1])]


@register
class AvgPool(_MeanOp):
    name = "avg_pool"

    def _divisor(self, layer, ins):
        a = layer.attrs
        k, override = a["kernel_size"], a["divisor_override"]
        per_window = (override is None and tuple(a["padding"]) != (0, 0)
                      and not a["count_include_pad"])
        return int(override or k[0] * k[1]), per_window

    def run_float(self, layer, ins, weights, flips):
        a = layer.attrs
        return F.avg_pool2d(ins[0], a["kernel_size"], a["stride"], a["padding"],
                            count_include_pad=a["count_include_pad"],
                            divisor_override=a["divisor_override"])

    def run_secure(self, party, layer, ins, weights, pre):
        a = layer.attrs
        with party.scope(layer.name):
            return avg_pool2d(party, ins[0], a["kernel_size"], a["stride"], a["padding"],
                                 count_include_pad=a["count_include_pad"],
                                 divisor_override=a["divisor_override"])

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        a = layer.attrs
        k = a["kernel_size"]
        v = F.avg_pool2d(v_in[0], k, a["stride"], a["padding"],
                         count_include_pad=a["count_include_pad"],
                         divisor_override=a["divisor_override"]) / (k[0] * k[1])
        return self._with_division(v, y, ctx)


@register
class GlobalAvgPool(_MeanOp):
    name = "global_avg_pool"

    def _divisor(self, layer, ins):
        return int(ins[0].shape[2] * ins[0].shape[3]), False

    def run_float(self, layer, ins, weights, flips):
        return ins[0].mean(dim=(2, 3), keepdim=layer.attrs["keepdim"])

    def local(self, party, layer, ins):
        return global_avg_pool2d(party, ins[0], keepdim=layer.attrs["keepdim"])

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        n = ins[0].shape[2] * ins[0].shape[3]
        v = v_in[0].mean(dim=(2, 3), keepdim=layer.attrs["keepdim"]) / n
        return self._with_division(v, y, ctx)


# --------------------------------------------------------------------------------------------
# Glue: other local operations on shares
# --------------------------------------------------------------------------------------------

@register
class Add(_LocalOp):
    name = "add"

    def run_float(self, layer, ins, weights, flips):
        return ins[0] + ins[1]

    def local(self, party, layer, ins):
        return add(ins[0], ins[1])

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return v_in[0] + v_in[1]


@register
class Sub(_LocalOp):
    name = "sub"

    def run_float(self, layer, ins, weights, flips):
        return ins[0] - ins[1]

    def local(self, party, layer, ins):
        return sub(ins[0], ins[1])

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return v_in[0] + v_in[1]


@register
class Concat(_LocalOp):
    name = "concat"

    def run_float(self, layer, ins, weights, flips):
        return torch.cat(ins, dim=layer.attrs.get("dim", 1))

    def local(self, party, layer, ins):
        return concat(ins, dim=layer.attrs.get("dim", 1))

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return torch.cat(v_in, dim=layer.attrs.get("dim", 1))


@register
class Flatten(_LocalOp):
    name = "flatten"

    def run_float(self, layer, ins, weights, flips):
        return ins[0].reshape(ins[0].shape[0], -1)

    def local(self, party, layer, ins):
        return ins[0].reshape(ins[0].shape[0], -1)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return v_in[0].reshape(y.shape)


@register
class AddPublic(_LocalOp):
    name = "add_public"

    def run_float(self, layer, ins, weights, flips):
        return ins[0] + layer.attrs["value"]

    def local(self, party, layer, ins):
        x = ins[0]
        c = encode(layer.attrs["value"], party.frac_bits, device="cpu" if x.is_meta else x.device)
        return add_public(party, x, c)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return v_in[0] + ctx.v_round


@register
class MulPublic(_LocalOp):
    name = "mul_public"

    def run_float(self, layer, ins, weights, flips):
        return ins[0] * layer.attrs["value"]

    def local(self, party, layer, ins):
        c, shift = public_matrix(party.frac_bits, layer.attrs["value"], ins[0])
        y = mul_public(ins[0], c)
        return truncate(party, y, shift) if shift else y

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return (v_in[0] * layer.attrs["value"] ** 2 + ins[0] * ins[0] * ctx.v_round
                + ctx.v_trunc)

    def truncated(self, layer, ins, y, weights, frac_bits):
        if _shift_bits(torch.as_tensor(layer.attrs["value"]), frac_bits):
            return [y * 2.0 ** (2 * frac_bits)]
        return []


@register
class Resize(_LocalOp):
    name = "resize"

    def run_float(self, layer, ins, weights, flips):
        a = layer.attrs
        return torch.matmul(torch.matmul(a["mh"], ins[0]), a["mw"].T)

    def local(self, party, layer, ins):
        x = ins[0]
        mh, sh = public_matrix(party.frac_bits, layer.attrs["mh"], x)
        mw, sw = public_matrix(party.frac_bits, layer.attrs["mw"], x)
        y = torch.matmul(mh, x)                 # public [Ho, H] @ shares [N, C, H, W]
        if sh:
            y = truncate(party, y, sh)
        y = torch.matmul(y, mw.transpose(0, 1))
        return truncate(party, y, sw) if sw else y

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        mh, mw = layer.attrs["mh"], layer.attrs["mw"]
        v = torch.matmul(torch.matmul(mh * mh, v_in[0]), (mw * mw).T)
        return (v + (ins[0] * ins[0]).amax(dim=(2, 3), keepdim=True) * ctx.v_round
                * (mh.shape[1] + mw.shape[1])
                + 2 * ctx.v_trunc * (1 + (mw * mw).sum(1).max().item()))

    def truncated(self, layer, ins, y, weights, frac_bits):
        out = []
        if _shift_bits(layer.attrs["mh"], frac_bits):
            out.append(torch.matmul(layer.attrs["mh"], ins[0]) * 2.0 ** (2 * frac_bits))
        if _shift_bits(layer.attrs["mw"], frac_bits):
            out.append(y * 2.0 ** (2 * frac_bits))
        return out



# --------------------------------------------------------------------------------------------
# Data movement on shares (local, no communication): any reshape, permutation or slice that
# keeps the batch dimension first
# --------------------------------------------------------------------------------------------

class _MoveOp(_LocalOp):
    """Public data movement of one input (``_apply``): the same on floats, on shares and on
    error variances."""

    def _apply(self, layer, x: Tensor) -> Tensor:
        raise NotImplementedError

    def run_float(self, layer, ins, weights, flips):
        return self._apply(layer, ins[0])

    def local(self, party, layer, ins):
        return self._apply(layer, ins[0])

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return self._apply(layer, v_in[0])


@register
class Reshape(_MoveOp):
    """x.reshape(N, *shape) (view, reshape, flatten, squeeze, unsqueeze)."""

    name = "reshape"

    def _apply(self, layer, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *layer.attrs["shape"])


@register
class Permute(_MoveOp):
    """x.permute(dims) with dims[0] = 0 (permute, transpose)."""

    name = "permute"

    def _apply(self, layer, x: Tensor) -> Tensor:
        return x.permute(*layer.attrs["dims"]).contiguous()


@register
class Slice(_MoveOp):
    """x.narrow(dim, start, length) for dim ≥ 1 (one piece of chunk, split)."""

    name = "slice"

    def _apply(self, layer, x: Tensor) -> Tensor:
        a = layer.attrs
        return x.narrow(a["dim"], a["start"], a["length"]).contiguous()


# --------------------------------------------------------------------------------------------
# The product of two shared tensors and the activations beyond ReLU
# --------------------------------------------------------------------------------------------

@register
class Mul(Op):
    """x ⊙ y for two image-dependent tensors (broadcasting, e.g. a squeeze-excitation gate
    [N, C, 1, 1] against its [N, C, H, W] input): one Beaver product (:func:`.linear.mul`,
    1 round, 8·|out| + 16·(|x| + |y|) bytes) and a local truncation."""

    name = "mul"

    def run_float(self, layer, ins, weights, flips):
        return ins[0] * ins[1]

    def run_secure(self, party, layer, ins, weights, pre):
        return mul(party, ins[0], ins[1], scope=layer.name)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        x, z = ins
        return v_in[0] * z * z + v_in[1] * x * x + ctx.v_trunc

    def truncated(self, layer, ins, y, weights, frac_bits):
        return [y * 2.0 ** (2 * frac_bits)]


class _PiecewiseLinearOp(Op):
    """An activation evaluated as a public piecewise-linear table by
    :func:`.activations.piecewise_linear` (k DReLUs per element, 3 rounds)."""

    def table(self, layer) -> PiecewiseLinear:
        raise NotImplementedError

    def run_float(self, layer, ins, weights, flips):
        return self.table(layer)(ins[0])

    def run_secure(self, party, layer, ins, weights, pre):
        return A.piecewise_linear(party, ins[0], self.table(layer), layer_drelu_config(layer),
                                  scope=layer.name)

    def drelus(self, layer, shape):
        return len(self.table(layer).knots) * math.prod(shape)

    def comparison_inputs(self, layer, ins):
        knots = torch.tensor(self.table(layer).knots, dtype=ins[0].dtype)
        return ins[0].reshape(1, -1) - knots.view(-1, 1)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        return _table_error_var(self.table(layer), ins[0], v_in[0], ctx)

    def truncated(self, layer, ins, y, weights, frac_bits):
        g = self.table(layer)
        if g.integer:
            return []
        return [(y - g.offset) * 2.0 ** (2 * frac_bits)]


def _table_error_var(g: PiecewiseLinear, x: Tensor, v: Tensor, ctx: ErrorContext) -> Tensor:
    """Error variance of the secure g(x) against the table in plaintext: the input's error
    through the slope, the knots' and offset's encodings, and for fractional coefficients
    their encoding (relative to each ReLU term) and the one truncation; plus, where the table
    approximates a function, its maximum error (a bounded error, variance ≤ max_error²)."""
    slope = g.derivative(x)
    out = v * slope * slope + ctx.v_round
    for t, c in zip(g.knots, g.coefs):
        out = out + c * c * ctx.v_round * (x >= t)
    if not g.integer:
        terms = g.slope * g.slope * x * x
        for t in g.knots:
            terms = terms + torch.relu(x - t) ** 2
        out = out + terms * ctx.v_round + ctx.v_trunc
    return out + g.max_error ** 2


@register
class Clamp(_PiecewiseLinearOp):
    """clamp(x, lo, hi): hardtanh, ReLU6 (a ReLU6 site's layer carries the site's name) and
    torch.clamp with one or two bounds; exact: one DReLU per bound and element."""

    name = "clamp"

    def table(self, layer):
        return clamp_pwl(layer.attrs["lo"], layer.attrs["hi"])

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        a, x = layer.attrs, ins[0]
        inside = torch.ones_like(x, dtype=torch.bool)
        if a["lo"] is not None:
            inside &= x > a["lo"]
        if a["hi"] is not None:
            inside &= x < a["hi"]
        return v_in[0] * inside + ctx.v_round   # 1-Lipschitz; the bound's encoding


@register
class Hardsigmoid(_PiecewiseLinearOp):
    """torch's hardsigmoid ReLU6(x + 3)/6, exact: two DReLUs per element."""

    name = "hardsigmoid"

    def table(self, layer):
        return hardsigmoid_pwl()


@register
class Approximated(_PiecewiseLinearOp):
    """sigmoid, tanh, SiLU or GELU (``function``) by its piecewise-linear table
    (:func:`.pwl.approximation`: k DReLUs per element, maximum error stated per table)."""

    name = "approx"

    def table(self, layer):
        return approximation(layer.attrs["function"])


@register
class Hardswish(Op):
    """hardswish(x) = x · hardsigmoid(x), exact: two DReLUs and one Beaver product per element
    (4 rounds)."""

    name = "hardswish"

    def run_float(self, layer, ins, weights, flips):
        return ins[0] * hardsigmoid_pwl()(ins[0])

    def run_secure(self, party, layer, ins, weights, pre):
        return A.hardswish(party, ins[0], layer_drelu_config(layer), scope=layer.name)

    def drelus(self, layer, shape):
        return 2 * math.prod(shape)

    def comparison_inputs(self, layer, ins):
        return Hardsigmoid().comparison_inputs(layer, ins)

    def error_var(self, layer, ins, v_in, y, weights, ctx):
        x, g = ins[0], hardsigmoid_pwl()
        h = g(x)
        v_h = _table_error_var(g, x, torch.zeros_like(x), ctx)
        slope = h + x * g.derivative(x)
        return v_in[0] * slope * slope + v_h * x * x + ctx.v_trunc

    def truncated(self, layer, ins, y, weights, frac_bits):
        h = hardsigmoid_pwl()(ins[0])
        return [h * 2.0 ** (2 * frac_bits), y * 2.0 ** (2 * frac_bits)]
