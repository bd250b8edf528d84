"""The exact engine's site runner: re-runs the part of a model after one activation site with a
substituted site output, cached prefix outputs, the incremental first conv and folded BN
(see :mod:`.engine` for the method)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..conversions import fold_bn
from ..multisite import MultiSiteActivation
from ..sites import ReluSite, run_model
from .base import DistortionError
from .tensors import (_is_channels_last, _tree_map, as_4d, check_finite, output_matrix, take_rows,
                      to_channels_last)
from .calls import _Call, _CallCounter


@dataclass
class Capture:
    """What the exact method keeps from one clean forward of a sample batch, for one site."""

    y: torch.Tensor                       # clean output [n, D]
    site_in: torch.Tensor                 # site input (pre-activation) [n, C, H, W]
    site_out: torch.Tensor                # site output [n, C, H, W]
    site_dim: int                         # 4, or 2 for [N, C] sites (after linear layers)
    frozen: dict[int, object] = field(default_factory=dict)  # call -> cached output
    needed: set[int] = field(default_factory=set)  # frozen calls whose output is read later
    leaf_out: torch.Tensor | None = None  # clean output of the conv right after the site
    folds: dict[int, int] = field(default_factory=dict)  # conv call -> BN call it feeds alone

    def to_channels_last(self) -> "Capture":
        """The same capture with its 4-D activations (site, cached outputs read later, the
        conv after the site) stored NHWC, so the rest of the network runs NHWC."""
        frozen = {i: (to_channels_last(v) if i in self.needed else v)
                  for i, v in self.frozen.items()}
        return Capture(y=self.y, site_in=self.site_in, site_out=to_channels_last(self.site_out),
                       site_dim=self.site_dim, frozen=frozen, needed=self.needed,
                       leaf_out=None if self.leaf_out is None
                       else to_channels_last(self.leaf_out), folds=self.folds)


class _UseTracker(TorchFunctionMode):
    """Calls ``on_args((args, kwargs))`` for every torch function run during a forward."""

    def __init__(self, on_args) -> None:
        super().__init__()
        self.on_args = on_args

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.on_args((args, kwargs))
        return func(*args, **kwargs)


def _conv_incremental_ok(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.groups == 1
            and module.padding_mode == "zeros" and not module._forward_hooks
            and not module._forward_pre_hooks)


def _shifted_taps(delta: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The kh*kw input taps of every output position of ``conv`` on delta [R, H, W], as
    [R, H', W', kh*kw] (zero padding; stride and dilation as in the conv). Built from
    strided slices: torch's im2col (``unfold``) was ~100x slower on one-channel rows."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    padded = nn.functional.pad(delta, (pw, pw, ph, ph))
    h_out = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    w_out = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    taps = [padded[:, i * dh: i * dh + (h_out - 1) * sh + 1: sh,
                   j * dw: j * dw + (w_out - 1) * sw + 1: sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=-1)


def _conv_update(conv: nn.Conv2d, clean: torch.Tensor, channels: list[int],
                 delta: torch.Tensor) -> torch.Tensor:
    """clean [R, Cout, H', W'] + conv of delta [R, H, W] placed in input channel channels[r]
    (no bias: it is already in ``clean``); the result has clean's memory format.

    Per row this is a [H'*W', kh*kw] x [kh*kw, Cout] product on the delta's taps, done for
    all rows by one batched matmul that also adds ``clean`` (one pass over the output);
    string paddings ('same') use a grouped convolution instead.
    """
    if isinstance(conv.padding, str):
        return _conv_update_grouped(conv, clean, channels, delta)
    r, cout = delta.shape[0], conv.out_channels
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    w = conv.weight[:, channels].transpose(0, 1).reshape(r, cout, kk)    # [R, Cout, kk]
    taps = _shifted_taps(delta.to(w.dtype), conv)                        # [R, H', W', kk]
    h_out, w_out = clean.shape[2:]
    taps = taps.reshape(r, h_out * w_out, kk)
    if _is_channels_last(clean):
        base = clean.permute(0, 2, 3, 1).reshape(r, h_out * w_out, cout).to(w.dtype)
        out = torch.baddbmm(base, taps, w.transpose(1, 2))                # [R, L, Cout]
        return out.reshape(r, h_out, w_out, cout).permute(0, 3, 1, 2).to(clean.dtype)
    base = clean.reshape(r, cout, h_out * w_out).to(w.dtype)
    out = torch.baddbmm(base, w, taps.transpose(1, 2))                   # [R, Cout, L]
    return out.reshape(r, cout, h_out, w_out).to(clean.dtype)


def _conv_update_grouped(conv: nn.Conv2d, clean: torch.Tensor, channels: list[int],
                         delta: torch.Tensor) -> torch.Tensor:
    """:func:`_conv_update` as one grouped convolution over the R rows (any padding mode
    ``conv2d`` accepts, including 'same')."""
    r = delta.shape[0]
    w = conv.weight[:, channels]                       # [Cout, R, kh, kw]
    w = w.transpose(0, 1).reshape(r * conv.out_channels, 1, *conv.weight.shape[2:])
    out = nn.functional.conv2d(delta.unsqueeze(0).to(w.dtype), w, None, conv.stride,
                               conv.padding, conv.dilation, groups=r)
    return clean + out.reshape(r, conv.out_channels, *out.shape[2:]).to(clean.dtype)


def _bn_foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain Conv2d followed by an eval-mode BatchNorm2d with running statistics, neither
    hooked: BN(conv(x)) is then one convolution with scaled weights and a new bias."""
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels
            and not (conv._forward_hooks or conv._forward_pre_hooks
                     or bn._forward_hooks or bn._forward_pre_hooks))


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the convolution equal to BN(conv(x)) in eval mode, folded in float64
    (:func:`secure_inference.conversions.fold_bn`) and rounded once to the conv's dtype."""
    weight, bias = fold_bn(conv.weight, conv.bias, bn)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class SiteRunner:
    """Re-runs the part of a model after one activation site with a substituted site output."""

    def __init__(self, model: nn.Module, calls: list[_Call], site: ReluSite) -> None:
        self.model = model
        self.calls = calls
        self.site = site
        own = [c for c in calls if c.path == site.module_path]
        if site.call_index >= len(own):
            raise DistortionError(f"site '{site.name}': module '{site.module_path}' was called "
                                  f"{len(own)} times, expected call {site.call_index}")
        s = own[site.call_index].start
        self.site_call = s
        # outermost calls that completed before the site's call started
        self.frozen = [c.start for c in calls
                       if c.end <= s and (c.parent == -1 or calls[c.parent].end > s)]
        self._patch_modules = {calls[i].module for i in self.frozen} | {calls[s].module}
        # the first leaf module call after the site: incrementally updated when it is a plain
        # Conv2d reading the site's output directly
        end = calls[s].end
        self.first_leaf = -1
        for c in calls[end:]:
            if c.end == c.start + 1:
                if _conv_incremental_ok(c.module):
                    self.first_leaf = c.start
                break
        # (conv, BN) leaf call pairs after the site that may run as one folded conv; capture()
        # keeps those where the BN's input is the conv's output and nothing else reads it
        self.fold_candidates = {
            c.start: c.start + 1 for c in calls[end:-1]
            if c.end == c.start + 1 and calls[c.start + 1].end == c.start + 2
            and c.start != self.first_leaf
            and _bn_foldable(c.module, calls[c.start + 1].module)}
        self._folded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _folded_weights(self, conv_call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded (weight, bias) of a (conv, BN) pair, computed once per runner."""
        if conv_call not in self._folded:
            conv = self.calls[conv_call].module
            bn = self.calls[self.fold_candidates[conv_call]].module
            self._folded[conv_call] = _folded_conv(conv, bn)
        return self._folded[conv_call]

    def _check_call(self, idx: int, module: nn.Module) -> None:
        if idx >= len(self.calls) or self.calls[idx].module is not module:
            raise DistortionError("the model's forward calls its modules in a different order "
                                  "from one run to the next; the exact method needs a static "
                                  "forward (use method='naive')")

    @torch.no_grad()
    def capture(self, x: torch.Tensor) -> Capture:
        """Clean forward on x: output, site input/output, the frozen calls' outputs (only
        those used outside frozen calls: the others are never read when the rest re-runs)
        and the clean output of the first layer after the site (incremental update)."""
        counter = _CallCounter(self.model)
        frozen = set(self.frozen)
        got: dict[str, object] = {}
        cache: dict[int, object] = {}
        tracked: dict[int, int] = {}   # id(tensor returned by a frozen call) -> call
        alive: list[torch.Tensor] = []  # keeps tracked ids valid during the forward
        needed: set[int] = set()
        depth = [0]                     # > 0 while a frozen call (or the site) runs
        skip = frozen | {self.site_call}
        pairs = self.fold_candidates
        bn_of = {b: c for c, b in pairs.items()}
        conv_obj: dict[int, tuple[torch.Tensor, int]] = {}  # conv call -> (output, version)
        conv_ids: dict[int, int] = {}    # id(conv output) -> conv call
        fold_ok: set[int] = set()
        fold_bad: set[int] = set()

        def pre(idx, module, args):
            self._check_call(idx, module)
            if idx in skip:
                depth[0] += 1
            if idx == self.site_call:
                got["in"] = as_4d(args[0]).clone()
            elif idx == self.first_leaf:
                site_obj = got.get("site_obj")
                got["leaf_in_is_site"] = (bool(args) and args[0] is site_obj
                                          and site_obj._version == got["site_version"])
            elif idx in bn_of:
                obj, version = conv_obj.get(bn_of[idx], (None, -1))
                if len(args) == 1 and args[0] is obj and obj._version == version:
                    fold_ok.add(bn_of[idx])

        def post(idx, module, out):
            # bookkeeping (clones) runs before depth drops: not a read by the forward
            if idx in frozen:
                cache[idx] = _tree_map(lambda t: t.clone(), out)

                def track(t, idx=idx):
                    tracked[id(t)] = idx
                    alive.append(t)
                _tree_map(track, out)
            elif idx == self.site_call:
                got["out"] = as_4d(out).clone()
                got["dim"] = out.dim()
                got["site_obj"] = out
                got["site_version"] = out._version  # in-place changes before the conv: no update
            elif idx == self.first_leaf:
                got["leaf_out"] = out.clone() if torch.is_tensor(out) else None
            elif idx in pairs and torch.is_tensor(out):
                conv_obj[idx] = (out, out._version)
                conv_ids[id(out)] = idx
            if idx in skip:
                depth[0] -= 1
            return None

        def use(t):
            i = tracked.get(id(t))
            if i is not None:
                needed.add(i)

        def conv_use(t):  # a conv output read anywhere but inside its own BN: no folding
            i = conv_ids.get(id(t))
            if i is not None and counter.stack[-1:] != [pairs[i]]:
                fold_bad.add(i)

        def on_args(args) -> None:
            if depth[0] == 0 and tracked:
                _tree_map(use, args)
            if conv_ids:
                _tree_map(conv_use, args)

        mode = _UseTracker(on_args)
        counter.on_pre, counter.on_post = pre, post
        with counter, mode:
            y = output_matrix(run_model(self.model, x))
        if "out" not in got:
            raise DistortionError(f"site '{self.site.name}' was not reached in the forward")
        check_finite(y, "the clean model output")
        leaf = got.get("leaf_out") if got.get("leaf_in_is_site") else None
        folds = {c: pairs[c] for c in sorted(fold_ok - fold_bad)}
        return Capture(y=y, site_in=got["in"], site_out=got["out"], site_dim=got["dim"],
                       frozen=cache, needed=needed, leaf_out=leaf, folds=folds)

    @torch.no_grad()
    def run_rows(self, cap: Capture, x: torch.Tensor, rows: Sequence[int],
                 activation: torch.Tensor,
                 delta: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Output [R, D] of the network for rows (sample indices into the captured batch) with
        the site's output replaced by ``activation`` [R, C, H, W].

        ``delta = (channel per row, [R, H, W] change of that channel)`` enables the
        incremental update of a Conv2d that directly consumes the site's output:
        conv(clean + delta) = clean conv output + conv of the one changed channel.
        """
        counter = _CallCounter(self.model)
        n = x.shape[0]
        calls = self.calls

        def gather(t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 1 and t.shape[0] == n:
                return take_rows(t, rows)
            return t

        substitutes = {}
        for i in self.frozen:
            if i in cap.needed:
                substitutes[i] = (lambda i=i: _tree_map(gather, cap.frozen[i]))
            else:  # never read by the computation that runs: no need to gather rows
                substitutes[i] = (lambda i=i: cap.frozen[i])
        value = activation if cap.site_dim == 4 else activation.reshape(activation.shape[0], -1)
        substitutes[self.site_call] = lambda: value
        version = value._version
        incremental = delta is not None and cap.leaf_out is not None
        originals = {}
        bn_calls = {b: c for c, b in cap.folds.items()}
        folded_out: dict[int, torch.Tensor] = {}  # conv call -> its folded output

        def make(module, orig):
            def forward(*args, **kwargs):
                idx = counter.stack[-1]
                if (incremental and idx == self.first_leaf and args and args[0] is value
                        and value._version == version and not kwargs):
                    return _conv_update(module, take_rows(cap.leaf_out, rows), *delta)
                if idx in cap.folds and len(args) == 1 and not kwargs:
                    folded_out[idx] = module._conv_forward(args[0], *self._folded_weights(idx))
                    return folded_out[idx]
                if idx in bn_calls and len(args) == 1 and not kwargs:
                    out = folded_out.pop(bn_calls[idx], None)
                    if out is not None and args[0] is out:
                        return out  # BN already applied by the folded conv
                fn = substitutes.get(idx)
                if fn is None:
                    return orig(*args, **kwargs)
                counter.counter = calls[idx].end  # skip the calls nested in this one
                if isinstance(module, MultiSiteActivation):
                    # its forward would have advanced the call counter: keep later calls right
                    module.skip_call()
                return fn()
            return forward

        def pre(idx, module, args):
            self._check_call(idx, module)

        counter.on_pre = pre
        patch = set(self._patch_modules)
        if incremental:
            patch.add(calls[self.first_leaf].module)
        for c, b in cap.folds.items():
            patch |= {calls[c].module, calls[b].module}
        try:
            for m in patch:
                originals[m] = m.__dict__.get("forward")
                m.forward = make(m, m.forward)
            with counter:
                y = output_matrix(run_model(self.model, take_rows(x, rows)))
        finally:
            for m, orig in originals.items():
                if orig is None:
                    del m.forward
                else:
                    m.forward = orig
        return y
