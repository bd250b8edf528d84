"""The distortion engines: naive, exact (prefix cached, candidates batched) and linear.

All three compute, for one activation site s, channel c and candidate block size b::

    D[s][c, b] = mean over samples of mean((f_{s,c,b}(x) - f(x))**2)

where ``f`` is the model output (``run_model``: logits, or decode-head logits) and
``f_{s,c,b}`` the same network with only channel c of site s replaced by Block-ReLU(b).
The functions here return *sums* over samples (float64); :func:`extract` divides by N.

* **naive**: one forward of the whole network per (channel, size), Block-ReLU modules swapped
  in; the reference the others are tested against.
* **exact**: the network is run once per sample batch to capture (a) the site's input and
  output and (b) the outputs of every module call that completed before the site's call
  started. The remainder of the network is then re-run on a batch of *rows*, one row per
  (sample, channel, size) whose perturbation is non-zero: module calls that completed before
  the site return their cached output (rows gathered from it only when later code reads it)
  instead of computing, the site returns the perturbed activation, everything after runs
  normally. Because only the site's *output* is substituted, skip connections that read the
  site's input, modules called at several sites and in-place operations behave exactly as
  in the clean network. Rows whose perturbation is zero (e.g. [1, 1] at a ReLU site)
  contribute exactly 0 and are not run. When the first module after the site is a plain
  Conv2d reading the site's output unchanged, it is updated incrementally: clean conv
  output + the convolution of the one changed channel (one batched matmul over all rows).
  Candidates of one (sample, channel) whose perturbed channels are equal share one row.
  At sites with >= 16 channels the rows run NHWC (faster CPU convolutions) and each
  eval-mode BatchNorm2d reading only a conv's output runs folded into that conv; the clean
  reference output is computed by the same runner, so both sides of every difference are
  rounded alike. The forward must be static (same module call order every run); this is
  checked.
* **linear**: ``f(a + d) - f(a) ≈ J d``, so ``mean((J d)**2) = E_u[(u·J d)**2] / D`` for a
  Rademacher vector u over the D outputs; ``u·J d = (Jᵀu)·d`` and ``Jᵀu`` at every site comes
  from one vector-Jacobian product. R projections per sample give an unbiased estimate of the
  first-order distortion for all sites, channels and sizes from R forward/backward passes.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..brelu import BlockReLU, block_sign_mask, is_identity
from ..conversions import fold_bn
from ..multisite import MultiSiteActivation
from ..sites import ReluSite, run_model
from ..spec import apply_block_spec, extract_block_spec

Progress = Callable[[int], None]

#: activation kinds whose site can be replaced by a Block-ReLU
REPLACEABLE_KINDS = ("ReLU", "BlockReLU", "MultiSiteActivation")


class DistortionError(ValueError):
    """Bad input for distortion extraction; the message says what was wrong and what to do."""


# --------------------------------------------------------------------------- helpers

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


def block_relu_all(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Block-ReLU of size ``size`` applied to every channel of x [N, C, H, W]."""
    h, w = int(size[0]), int(size[1])
    if is_identity(h, w):
        return x.clone()
    return x * block_sign_mask(x, h, w)


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


# --------------------------------------------------------------------------- call tracing

@dataclass
class _Call:
    module: nn.Module
    path: str
    start: int     # position of the call in the forward (pre-order numbering)
    end: int = -1  # first position after all calls nested in this one
    parent: int = -1


class _CallCounter:
    """Pre/post hooks on every module numbering the module calls of one forward in pre-order."""

    def __init__(self, model: nn.Module) -> None:
        self.paths = [(p, m) for p, m in model.named_modules()]
        self.counter = 0
        self.stack: list[int] = []
        self.handles: list = []
        self.on_pre: Callable[[int, nn.Module, tuple], None] | None = None
        self.on_post: Callable[[int, nn.Module, object], object] | None = None

    def __enter__(self) -> "_CallCounter":
        for _, m in self.paths:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        self.counter = 0
        self.stack = []
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, module, args):
        idx = self.counter
        self.counter += 1
        self.stack.append(idx)
        if self.on_pre is not None:
            self.on_pre(idx, module, args)

    def _post(self, module, args, out):
        idx = self.stack.pop()
        if self.on_post is not None:
            return self.on_post(idx, module, out)
        return None


def trace_calls(model: nn.Module, x: torch.Tensor) -> list[_Call]:
    """Every module call of one forward of ``model`` on ``x``, in pre-order."""
    counter = _CallCounter(model)
    paths = {m: p for p, m in counter.paths}
    calls: list[_Call] = []

    def pre(idx, module, args):
        parent = counter.stack[-2] if len(counter.stack) > 1 else -1
        calls.append(_Call(module, paths[module], idx, parent=parent))

    def post(idx, module, out):
        calls[idx].end = counter.counter
        return None

    counter.on_pre, counter.on_post = pre, post
    with torch.no_grad(), counter:
        run_model(model, x)
    return calls


# --------------------------------------------------------------------------- site runner

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


# --------------------------------------------------------------------------- exact

@dataclass
class RowPlan:
    """Which (size, sample, channel) candidates of a chunk must run through the network.

    A candidate whose perturbed channel equals the clean one has distortion exactly 0 and is
    not run; candidates of the same (sample, channel) whose perturbed channels are equal
    (e.g. two large blocks that both keep every pixel) share one row.
    """

    size: torch.Tensor    # [U] candidate index of each row to run
    sample: torch.Tensor  # [U] sample index in the batch
    chan: torch.Tensor    # [U] position in the chunk's channel list
    slot: torch.Tensor    # [K, n, Cc] row (into the U rows) of every candidate; -1: zero

    @property
    def rows(self) -> int:
        """Number of rows to run (U)."""
        return int(self.size.numel())


def _unique_index(keys: np.ndarray) -> np.ndarray:
    """For rows of ``keys`` [M, L] (any dtype), the index of each row's class of
    byte-identical rows (classes numbered 0..U-1)."""
    flat = np.ascontiguousarray(keys).reshape(keys.shape[0], -1)
    void = flat.view(np.dtype((np.void, flat.shape[1] * flat.dtype.itemsize))).ravel()
    return np.unique(void, return_inverse=True)[1].reshape(-1)


def plan_rows(pert: torch.Tensor, base: torch.Tensor, dedupe: bool = True) -> RowPlan:
    """The rows to run for perturbed channels ``pert`` [K, n, Cc, H, W] against the clean
    ones ``base`` [n, Cc, H, W]: non-zero perturbations, identical ones merged per
    (sample, channel) when ``dedupe`` (values compared as floats: -0.0 == +0.0)."""
    k, n, cc = pert.shape[:3]
    flat = pert.reshape(k, n, cc, -1)
    nonzero = (flat != base.reshape(1, n, cc, -1)).any(dim=3).cpu()      # [K, n, Cc]
    m = k * n * cc
    if dedupe:
        values = (flat + 0.0).cpu().numpy().reshape(m, -1)             # + 0.0: -0.0 -> +0.0
        group = np.arange(m, dtype=np.int64) % (n * cc)                  # (sample, channel)
        cls = _unique_index(np.stack([group, _unique_index(values)], axis=1))
    else:
        cls = np.arange(m)
    cls = torch.from_numpy(cls).reshape(k, n, cc)
    # one row per class with a non-zero perturbation, at its first candidate
    first = torch.full((int(cls.max()) + 1,), m, dtype=torch.long)
    first.scatter_reduce_(0, cls.reshape(-1), torch.arange(m), reduce="amin")
    keep = nonzero.reshape(-1)[first]
    row_of_class = torch.full_like(first, -1)
    row_of_class[keep] = torch.arange(int(keep.sum()))
    reps = first[keep]
    size, rest = reps // (n * cc), reps % (n * cc)
    return RowPlan(size=size, sample=rest // cc, chan=rest % cc, slot=row_of_class[cls])


def _reference_output(runner: "SiteRunner", cap: Capture, x: torch.Tensor,
                      chan: int) -> torch.Tensor:
    """Clean output [n, D] computed like the perturbed rows (same runner, memory format and
    incremental update with a zero change), so that float rounding of the two paths does
    not enter the differences."""
    n = x.shape[0]
    delta = None
    if cap.leaf_out is not None:
        delta = ([chan] * n, torch.zeros_like(cap.site_out[:, 0]))
    return runner.run_rows(cap, x, range(n), cap.site_out.clone(), delta)


def _row_batch(cap: Capture, plan: RowPlan, pert: torch.Tensor, base: torch.Tensor,
               chans: list[int], idx: slice):
    """(sample rows, site activations [B, C, H, W], (channel per row, change [B, H, W]))
    for the plan's rows ``idx``: the clean activation with one channel replaced."""
    size, sample, chan = plan.size[idx], plan.sample[idx], plan.chan[idx]
    dev = pert.device
    size_d, sample_d, chan_d = size.to(dev), sample.to(dev), chan.to(dev)
    new = pert[size_d, sample_d, chan_d]                                 # [B, H, W]
    rows_c = [chans[c] for c in chan.tolist()]
    act = take_rows(cap.site_out, sample.tolist())
    act[torch.arange(len(rows_c), device=dev), torch.as_tensor(rows_c, device=dev)] = new
    return sample.tolist(), act, (rows_c, new - base[sample_d, chan_d])


def _fast_path(choice: bool | None, cap: Capture) -> bool:
    """Whether an optional speed-up (NHWC rows, BN folding) is used for this site: ``choice``,
    or for None a 4-D site with >= 16 channels (on a few channels neither gains anything,
    and both change the float rounding of the rest of the network)."""
    if cap.site_dim != 4:
        return False
    return bool(choice) if choice is not None else cap.site_out.shape[1] >= 16


def exact_site_sums(model: nn.Module, calls: list[_Call], site: ReluSite,
                    batches: Iterable[torch.Tensor], channels: Sequence[int],
                    sizes: np.ndarray, forward_batch: int = 64,
                    progress: Progress | None = None,
                    stats: dict | None = None, channels_last: bool | None = None,
                    fold_bn: bool | None = None, dedupe: bool = True) -> np.ndarray:
    """Sum over samples of the per-sample output MSE, [len(channels), K] float64 (exact).

    ``channels_last``: run the rest of the network on NHWC activations (faster convolutions
    on CPU). ``fold_bn``: run each eval-mode BatchNorm2d that only reads a Conv2d's output
    after the site as part of that conv (weights scaled once; one pass over the activations
    fewer). None for either: only at 4-D sites with >= 16 channels. ``dedupe``: run identical
    perturbations of a (sample, channel) once. ``stats`` (optional dict) is given
    ``rows_run`` (rows actually run), ``rows_nonzero`` (candidate×sample pairs with a
    non-zero perturbation) and ``rows_total`` (all candidate×sample pairs)."""
    runner = SiteRunner(model, calls, site)
    chan_list = [int(c) for c in channels]
    k = len(sizes)
    sums = torch.zeros(k, len(chan_list), dtype=torch.float64)
    for x in batches:
        cap = runner.capture(x)
        if not _fast_path(fold_bn, cap):
            cap.folds = {}
        if _fast_path(channels_last, cap):
            cap = cap.to_channels_last()
        n = x.shape[0]
        idx = torch.as_tensor(chan_list, dtype=torch.long, device=cap.site_in.device)
        base = cap.site_out[:, idx]
        # perturbed channel values for every size: [K, n, Cc, H, W]
        pert = torch.stack([block_relu_all(cap.site_in[:, idx], s) for s in sizes])
        plan = plan_rows(pert, base, dedupe)
        if stats is not None:
            stats["rows_run"] = stats.get("rows_run", 0) + plan.rows
            stats["rows_nonzero"] = stats.get("rows_nonzero", 0) + int((plan.slot >= 0).sum())
            stats["rows_total"] = stats.get("rows_total", 0) + plan.slot.numel()
        mse = torch.zeros(plan.rows + 1, dtype=torch.float64)  # last entry: zero rows
        if plan.rows:
            ref = _reference_output(runner, cap, x, chan_list[0]).double()
            check_finite(ref, "the clean model output")
        for start in range(0, plan.rows, forward_batch):
            part = slice(start, min(start + forward_batch, plan.rows))
            rows, act, delta = _row_batch(cap, plan, pert, base, chan_list, part)
            y = runner.run_rows(cap, x, rows, act, delta if cap.leaf_out is not None else None)
            check_finite(y, f"the output with site '{site.name}' perturbed")
            mse[part] = (y.double() - take_rows(ref, rows)).pow(2).mean(dim=1).cpu()
        sums += mse[plan.slot].sum(dim=1)          # slot -1 picks the zero entry
        if progress is not None:
            progress(n * len(chan_list) * k)
    return sums.T.contiguous().numpy()


# --------------------------------------------------------------------------- naive

def _site_holder(model: nn.Module, site: ReluSite):
    """(container, key) such that container[key] / getattr is the Block-ReLU of the site."""
    module = model.get_submodule(site.module_path)
    if isinstance(module, MultiSiteActivation):
        return module.sites, site.call_index
    parent_path, _, attr = site.module_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def naive_site_sums(model: nn.Module, site: ReluSite, batches: Iterable[torch.Tensor],
                    channels: Sequence[int], sizes: np.ndarray, input_shape: Sequence[int],
                    progress: Progress | None = None) -> np.ndarray:
    """Reference: one whole-network forward per (channel, size) with a Block-ReLU swapped in."""
    net = copy.deepcopy(model).eval()
    current = extract_block_spec(net, input_shape).get(site.name)
    rows = (np.ones((site.channels, 2), np.int32) if current is None else current.copy())
    apply_block_spec(net, {site.name: rows}, input_shape)
    holder, key = _site_holder(net, site)
    batches = list(batches)
    device = batches[0].device

    def install(spec: np.ndarray) -> None:
        module = BlockReLU(spec).to(device)
        if isinstance(key, int):
            holder[key] = module
        else:
            setattr(holder, key, module)

    with torch.no_grad():
        install(rows)
        clean = [output_matrix(run_model(net, x)).double() for x in batches]
        out = np.zeros((len(channels), len(sizes)))
        for ci, c in enumerate(channels):
            for ki, size in enumerate(sizes):
                spec = rows.copy()
                spec[c] = size
                install(spec)
                total = 0.0
                for x, y0 in zip(batches, clean):
                    y = output_matrix(run_model(net, x)).double()
                    total += float((y - y0).pow(2).mean(dim=1).sum())
                out[ci, ki] = total
            if progress is not None:
                progress(sum(len(x) for x in batches) * len(sizes))
    return out


# --------------------------------------------------------------------------- linear

def projection_seed(seed: int, first_sample: int) -> int:
    """Seed of the projections of the batch starting at ``first_sample`` (not secret)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(first_sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def linear_sums(model: nn.Module, calls: list[_Call], sites: Sequence[ReluSite],
                batches: Iterable[torch.Tensor], sizes: dict[str, np.ndarray],
                num_projections: int = 8, seed: int = 0, first_sample: int = 0,
                progress: Progress | None = None) -> dict[str, np.ndarray]:
    """First-order estimate (sums over samples) of the distortion [C, K] of every site.

    The projections of the batch starting at sample ``first_sample + offset`` come from a
    generator seeded by :func:`projection_seed` (``seed``, that sample index), so results do
    not depend on how samples are split between workers with the same batch size.
    """
    runners = {s.name: SiteRunner(model, calls, s) for s in sites}
    by_call = {r.site_call: name for name, r in runners.items()}
    sums = {s.name: np.zeros((s.channels, len(sizes[s.name]))) for s in sites}
    r = int(num_projections)
    if r < 1:
        raise DistortionError("num_projections must be >= 1")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    offset = int(first_sample)
    try:
        for x in batches:
            n = x.shape[0]
            generator = torch.Generator().manual_seed(projection_seed(seed, offset))
            offset += n
            counter = _CallCounter(model)
            ins: dict[str, torch.Tensor] = {}
            outs: dict[str, torch.Tensor] = {}
            zs: dict[str, torch.Tensor] = {}

            def pre(idx, module, args):
                name = by_call.get(idx)
                if name is not None:
                    ins[name] = as_4d(args[0])[:n].detach().clone()

            def post(idx, module, out):
                name = by_call.get(idx)
                if name is None:
                    return None
                outs[name] = as_4d(out)[:n].detach().clone()
                z = torch.zeros_like(out, requires_grad=True)
                zs[name] = z
                return out + z

            counter.on_pre, counter.on_post = pre, post
            xr = x.repeat(r, *([1] * (x.dim() - 1)))  # projection-major rows: j*n + i
            with torch.enable_grad(), counter:
                y = output_matrix(run_model(model, xr))
                check_finite(y.detach(), "the clean model output")
                u = torch.randint(0, 2, y.shape, generator=generator,
                                  device="cpu").to(y.device, y.dtype) * 2 - 1
                missing = [s.name for s in sites if s.name not in zs]
                if missing:
                    raise DistortionError(f"sites {missing} were not reached in the forward")
                names = [s.name for s in sites]
                grads = torch.autograd.grad((u * y).sum(), [zs[nm] for nm in names],
                                            allow_unused=True)
            d_out = y.shape[1]
            for site, g in zip(sites, grads):
                name = site.name
                if g is None:
                    continue
                g = as_4d(g.detach()).reshape(r, n, *outs[name].shape[1:]).double()
                for ki, size in enumerate(sizes[name]):
                    delta = (block_relu_all(ins[name], size) - outs[name]).double()
                    proj = (g * delta[None]).sum(dim=(3, 4))           # [R, n, C]
                    est = proj.pow(2).mean(dim=0) / d_out              # [n, C]
                    sums[name][:, ki] += est.sum(dim=0).cpu().numpy()
            if progress is not None:
                progress(n * sum(s.channels * len(sizes[s.name]) for s in sites))
    finally:
        for p in params:
            p.requires_grad_(True)
    return sums
