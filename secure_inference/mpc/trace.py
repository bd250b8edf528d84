"""Trace a torch model into a program of secure layers (public) plus the server's weights.

:func:`compile_model` runs ONE plaintext forward pass of the model (eval mode, no grad) on a
random input of the given shape and records every operation that touches the image, at the
level of modules for the layers that carry weights or activations and at the level of torch
functions for the glue between them (residual adds, concatenation, flattening, resizing):

* a :class:`TorchFunctionMode` sees every torch function call (``F.interpolate``,
  ``torch.cat``, ``Tensor.__iadd__``, ``Tensor.view`` ...) made outside a recorded module;
* forward hooks on every module record the *leaf* layers (Conv2d, BatchNorm2d, Linear, ReLU,
  ReLU6, BlockReLU, BlockReLU6, pooling, dropout ...) as single layers, ignoring what happens
  inside them.

Tensors are followed by object identity, so in-place operations (``out += identity``,
``ReLU(inplace=True)``) simply rebind the tensor to the newest layer. This works on the four
reference architectures (torchvision/mmpretrain ResNets, mmseg DeepLabV3 with ResNetV1c and
MobileNetV2 backbones), where ``torch.fx`` fails on data-dependent Python control flow; the
price is that the program is specialised to the control flow taken for this input shape
(the layers themselves are batch-size independent).

Afterwards BatchNorm is folded into the preceding convolution (or becomes a depthwise 1×1
convolution when it has none), dropout/identity/contiguous are removed, and activation layers
are matched against :func:`secure_inference.find_relu_sites` so each carries its site name.

The :class:`Program` holds only public information (architecture, shapes, block sizes); the
weights come back separately (:class:`Weights`, the server's secret). Anything the secure
runtime cannot compute raises :class:`UnsupportedOperationError` naming the operation and the
module where it happened, before any party connects.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..brelu import BlockActivation, BlockReLU6, as_block_sizes
from ..conversions import fold_bn
from ..sites import find_relu_sites, run_model
from ..spec import apply_block_spec, spec_calibration
from ..tracing import ModuleTracer
from ..widths import FULL_WIDTH, MIN_WIDTH, Calibration, CalibrationError
from .ops import DROP_ATTR, WIDTH_ATTR, layer_drelus
from .protocols.relu import adaptive_windows
from .program import Layer, Program, UnsupportedOperationError, Weights
from .ring import DEFAULT_FRAC_BITS

__all__ = ["compile_model", "fold_bn", "resize_matrices", "pool_matrices"]


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------

_LEAF_TYPES: tuple[type, ...] = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, BlockActivation,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
    nn.Dropout2d, nn.Identity, nn.Flatten, nn.Upsample)

# functions that return tensors unrelated to the data flow or non-tensors: ignored
_IGNORED = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__len__, torch.Tensor.numel,
            torch.Tensor.shape.__get__ if hasattr(torch.Tensor.shape, "__get__") else None,
            torch.Tensor.is_floating_point, torch.Tensor.device.__get__,
            torch.Tensor.dtype.__get__, torch.Tensor.requires_grad.__get__}
_IGNORED.discard(None)

_PASS_THROUGH = {torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.detach,
                 F.dropout, F.dropout2d, torch.dropout, torch.Tensor.float, torch.clone}

_ADD_FUNCS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
              torch.Tensor.__iadd__, torch.Tensor.__radd__, operator.add}
_MUL_FUNCS = {torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__,
              torch.Tensor.__imul__, torch.Tensor.__rmul__}
_RELU_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RESHAPE_FUNCS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.flatten,
                  torch.Tensor.flatten, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze,
                  torch.Tensor.unsqueeze}
_PERMUTE_FUNCS = {torch.permute, torch.Tensor.permute}
_TRANSPOSE_FUNCS = {torch.transpose, torch.Tensor.transpose, torch.swapaxes,
                    torch.Tensor.swapaxes, torch.swapdims, torch.Tensor.swapdims}
_SPLIT_FUNCS = {torch.chunk, torch.Tensor.chunk, torch.split, torch.Tensor.split,
                torch.tensor_split, torch.Tensor.tensor_split, torch.unbind,
                torch.Tensor.unbind}
_DIV_FUNCS = {torch.div, torch.Tensor.div, torch.Tensor.div_, torch.Tensor.__truediv__,
              torch.Tensor.__itruediv__, torch.true_divide}
_CLAMP_FUNCS = {torch.clamp, torch.Tensor.clamp, torch.Tensor.clamp_, torch.clip,
                torch.Tensor.clip, torch.Tensor.clip_, torch.clamp_min, torch.Tensor.clamp_min,
                torch.Tensor.clamp_min_, torch.clamp_max, torch.Tensor.clamp_max,
                torch.Tensor.clamp_max_}
# smooth activations computed from a piecewise-linear table (protocols/pwl.py)
_APPROX_FUNCS = {torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
                 torch.Tensor.sigmoid_: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
                 torch.Tensor.tanh: "tanh", torch.Tensor.tanh_: "tanh", F.tanh: "tanh",
                 F.silu: "silu", F.gelu: "gelu"}
# what the runtime cannot compute yet, with why
_REFUSED = {F.layer_norm: "LayerNorm needs a secure inverse square root, which the runtime "
                          "does not have (convnext and vision transformers stay unsupported)",
            F.group_norm: "GroupNorm needs a secure inverse square root, which the runtime "
                          "does not have",
            F.softmax: "softmax needs a secure exponential and division, which the runtime "
                       "does not have (the client can apply it to the revealed logits)"}


class _Tracer(ModuleTracer):
    """Records the layers of one forward pass (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.nodes: list[dict[str, Any]] = []
        self.producer: dict[int, int] = {}   # id(tensor) -> node index
        self.keep: list[torch.Tensor] = []   # keeps traced tensors alive (stable ids)

    # --- bookkeeping ---
    def _where(self) -> str:
        return self.current_path() or "<model>"

    def _in_leaf(self) -> bool:
        return any(isinstance(m, _LEAF_TYPES) for m in self.stack)

    def add_node(self, op: str, inputs: Sequence[int], out: torch.Tensor, where: str,
                 **attrs) -> int:
        self.nodes.append(dict(op=op, inputs=list(inputs), attrs=attrs, where=where,
                               shape=tuple(out.shape), module=attrs.pop("module", None)))
        idx = len(self.nodes) - 1
        self.producer[id(out)] = idx
        self.keep.append(out)
        return idx

    def node_of(self, t: Any) -> int | None:
        return self.producer.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _fail(self, what: str, where: str, why: str = "") -> None:
        raise UnsupportedOperationError(
            f"unsupported operation {what} at '{where}' for secure inference{': ' + why if why else ''}."
            " Supported: Conv2d/Linear (+BatchNorm), ReLU/Block-ReLU, ReLU6/hardtanh/clamp, "
            "hardsigmoid/hardswish, sigmoid/tanh/SiLU/GELU (piecewise-linear), max/avg/adaptive "
            "pooling, residual add, products of two tensors, concat/split/reshape/permute, "
            "dropout (eval), bilinear/nearest resize.")

    # --- module hooks ---
    def on_module(self, module, args, out):
        if not isinstance(module, _LEAF_TYPES) or self._in_leaf():
            return None
        path = self.paths[module]
        x = args[0] if args else None
        src = self.node_of(x)
        if src is None:
            if any(self.node_of(a) is not None for a in args[1:]):
                self._fail(type(module).__name__, path, "the image reaches it through an "
                           "argument other than the first")
            return None  # does not touch the image: a constant
        if not isinstance(out, torch.Tensor):
            self._fail(type(module).__name__, path, "it does not return one tensor")
        if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            return self._alias(out, src, x)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                self._fail(f"Conv2d(padding_mode={module.padding_mode!r})", path)
            if isinstance(module.padding, str):
                pad = _same_padding(module, x.shape) if module.padding == "same" else (0, 0)
            else:
                pad = tuple(module.padding)
            self.add_node("conv2d", [src], out, path, module=module, stride=tuple(module.stride),
                          padding=pad, dilation=tuple(module.dilation), groups=module.groups,
                          weight_shape=tuple(module.weight.shape))
        elif isinstance(module, nn.Linear):
            self.add_node("linear", [src], out, path, module=module,
                          weight_shape=tuple(module.weight.shape))
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if not module.track_running_stats or module.running_mean is None:
                self._fail(type(module).__name__, path, "it has no running statistics")
            self.add_node("batchnorm", [src], out, path, module=module)
        elif isinstance(module, (nn.ReLU, BlockActivation, nn.ReLU6)):
            sizes = (module.block_sizes.cpu().numpy().astype(np.int32)
                     if isinstance(module, BlockActivation)
                     else np.ones((out.shape[1], 2), np.int32))
            clip = {"clip": 6.0} if isinstance(module, (nn.ReLU6, BlockReLU6)) else {}
            self.add_node("activation", [src], out, path, block_sizes=sizes, **clip)
        elif isinstance(module, nn.MaxPool2d):
            if _pair(module.dilation) != (1, 1) or module.return_indices:
                self._fail("MaxPool2d(dilation/return_indices)", path)
            self._max_pool(out, src, path, module.kernel_size, module.stride, module.padding,
                           module.ceil_mode)
        elif isinstance(module, nn.AdaptiveMaxPool2d):
            if module.return_indices:
                self._fail("AdaptiveMaxPool2d(return_indices=True)", path)
            self._adaptive_max(out, src, x, path, module.output_size)
        elif isinstance(module, nn.AvgPool2d):
            self._avg_pool(out, src, x, path, module.kernel_size, module.stride, module.padding,
                           module.ceil_mode, module.count_include_pad, module.divisor_override)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            self._adaptive_avg(out, src, x, path, module.output_size)
        elif isinstance(module, nn.Flatten):
            self._flatten(out, src, x, path, module.start_dim, module.end_dim)
        elif isinstance(module, nn.Upsample):
            self._resize(out, src, x, path, module.mode, module.align_corners,
                         dict(size=module.size, scale_factor=module.scale_factor,
                              mode=module.mode, align_corners=module.align_corners))
        return None

    def _alias(self, out, src, x):
        if out is not x:
            self.producer[id(out)] = src
            self.keep.append(out)
        return None

    def _max_pool(self, out, src, path, kernel_size, stride, padding, ceil_mode):
        extra = {"ceil_mode": True} if ceil_mode else {}
        self.add_node("max_pool", [src], out, path, kernel_size=_pair(kernel_size),
                      stride=_pair(stride or kernel_size), padding=_pair(padding), **extra)

    def _adaptive_max(self, out, src, x, path, output_size):
        h, w = x.shape[-2:]
        oh, ow = _pair_none(output_size, (h, w))
        window = tuple(max(e - s for s, e in zip(*adaptive_windows(n, o)))
                       for n, o in ((h, oh), (w, ow)))
        self.add_node("adaptive_max_pool", [src], out, path, output_size=(oh, ow),
                      window=window)

    def _avg_pool(self, out, src, x, path, kernel_size, stride, padding, ceil_mode,
                  count_include_pad, divisor_override):
        if ceil_mode:   # partial windows with their own divisors: a public separable map
            kw = dict(kernel_size=_pair(kernel_size), stride=_pair(stride or kernel_size),
                      padding=_pair(padding), ceil_mode=True,
                      count_include_pad=bool(count_include_pad),
                      divisor_override=divisor_override)
            mh, mw = pool_matrices(tuple(x.shape[-2:]), F.avg_pool2d, kw)
            if (mh.shape[0], mw.shape[0]) != tuple(out.shape[-2:]):
                self._fail("avg_pool2d(ceil_mode=True)", path, "could not reproduce its output")
            self.add_node("resize", [src], out, path, mode="avg_pool_ceil", mh=mh, mw=mw)
            return
        self.add_node("avg_pool", [src], out, path, kernel_size=_pair(kernel_size),
                      stride=_pair(stride or kernel_size), padding=_pair(padding),
                      count_include_pad=bool(count_include_pad),
                      divisor_override=divisor_override)

    def _adaptive_avg(self, out, src, x, path, output_size):
        h, w = x.shape[-2:]
        oh, ow = _pair_none(output_size, (h, w))
        if (oh, ow) == (1, 1):
            self.add_node("global_avg_pool", [src], out, path, keepdim=True)
        elif h % oh == 0 and w % ow == 0:
            k = (h // oh, w // ow)
            self.add_node("avg_pool", [src], out, path, kernel_size=k, stride=k, padding=(0, 0),
                          count_include_pad=True, divisor_override=None)
        else:   # uneven, overlapping or upsampling windows: a public separable linear map
            mh, mw = pool_matrices((h, w), F.adaptive_avg_pool2d, {"output_size": (oh, ow)})
            self.add_node("resize", [src], out, path, mode="adaptive_avg", mh=mh, mw=mw)

    def _flatten(self, out, src, x, path, start, end):
        start = start % x.dim()
        end = end % x.dim()
        if start == 0 and end > 0:
            self._fail(f"flatten(start_dim={start}, end_dim={end})", path,
                       "it merges the batch dimension")
        self._reshape(out, src, x, path)

    def _reshape(self, out, src, x, path):
        """A reshape that keeps the batch dimension first: an alias, the flatten layer
        ([N, -1]) or a reshape layer."""
        if out.dim() == 0 or x.dim() == 0 or out.shape[0] != x.shape[0]:
            self._fail("reshape", path, f"{list(x.shape)} -> {list(out.shape)} does not keep "
                       "the batch dimension first")
        if tuple(out.shape) == tuple(x.shape):
            return self._alias(out, src, x)
        if out.dim() == 2:
            return self.add_node("flatten", [src], out, path)
        return self.add_node("reshape", [src], out, path, shape=tuple(out.shape[1:]))

    def _resize(self, out, src, x, path, mode, align_corners, kwargs):
        if mode not in ("bilinear", "nearest"):
            self._fail(f"interpolate(mode={mode!r})", path)
        if x.dim() != 4:
            self._fail("interpolate", path, "expects an [N, C, H, W] input")
        mh, mw = resize_matrices(tuple(x.shape[-2:]), kwargs)
        if (mh.shape[0], mw.shape[0]) != tuple(out.shape[-2:]):
            self._fail("interpolate", path, "could not reproduce its output size")
        self.add_node("resize", [src], out, path, mode=mode, mh=mh, mw=mw)

    # --- functions ---
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._in_leaf() or func in _IGNORED:
            return out
        flat = list(args) + list(kwargs.values())
        flat = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a])]
        srcs = [self.node_of(t) for t in flat]
        if all(s is None for s in srcs):
            return out
        if func in _SPLIT_FUNCS and isinstance(out, (list, tuple)):
            self._record_split(func, args, kwargs, out)
            return out
        if not isinstance(out, torch.Tensor):
            if isinstance(out, (int, float, bool, torch.Size, torch.dtype, torch.device)) or \
                    out is None:
                return out
            self._fail(_fname(func), self._where(), f"it returns {type(out).__name__}")
        self._record_function(func, args, kwargs, out)
        return out

    def _record_split(self, func, args, kwargs, out):
        """chunk / split / tensor_split / unbind: one slice layer per piece."""
        where = f"{self._where()} ({_fname(func)})"
        x = args[0]
        src = self.node_of(x)
        if src is None:
            self._fail(_fname(func), where, "the image reaches it through another argument")
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        if func in (torch.unbind, torch.Tensor.unbind):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        dim = int(dim) % x.dim()
        if dim == 0:
            self._fail(f"{_fname(func)}(dim=0)", where, "it splits the batch dimension")
        start = 0
        for piece in out:
            length = 1 if piece.dim() < x.dim() else int(piece.shape[dim])
            node = self.add_node("slice", [src], piece, where, dim=dim, start=start,
                                 length=length)
            if piece.dim() < x.dim():   # unbind drops the dimension
                self.nodes[node]["shape"] = tuple(x.narrow(dim, 0, 1).shape)
                self.add_node("reshape", [node], piece, where, shape=tuple(piece.shape[1:]))
            start += length

    def _record_function(self, func, args, kwargs, out):
        where = f"{self._where()} ({_fname(func)})"
        x = args[0] if args else None
        src = self.node_of(x)
        if func in _PASS_THROUGH:
            if func in (F.dropout, F.dropout2d, torch.dropout):
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                if training and func is not torch.dropout:
                    self._fail(_fname(func), where, "dropout in training mode")
            return self._alias(out, src, x)
        if func in _ADD_FUNCS or func in _MUL_FUNCS or func in (torch.sub, torch.Tensor.sub,
                                                                torch.Tensor.__sub__):
            y = args[1] if len(args) > 1 else kwargs.get("other")
            a, b = self.node_of(x), self.node_of(y)
            if "alpha" in kwargs and kwargs["alpha"] != 1:
                self._fail(_fname(func) + "(alpha != 1)", where)
            is_mul = func in _MUL_FUNCS
            is_sub = func in (torch.sub, torch.Tensor.sub, torch.Tensor.__sub__)
            if a is not None and b is not None:
                if is_mul:
                    if x.dim() != y.dim() or x.shape[0] != y.shape[0]:
                        self._fail(_fname(func), where, f"a product {list(x.shape)} * "
                                   f"{list(y.shape)} that broadcasts over the batch")
                    self.add_node("mul", [a, b], out, where)
                    return
                if tuple(x.shape) != tuple(y.shape):
                    self._fail(_fname(func), where, f"broadcasting add {list(x.shape)} + "
                               f"{list(y.shape)}")
                self.add_node("sub" if is_sub else "add", [a, b], out, where)
                return
            var, const = (x, y) if a is not None else (y, x)
            node = a if a is not None else b
            c = torch.as_tensor(const, dtype=torch.float64).detach().cpu()
            if is_mul:
                self.add_node("mul_public", [node], out, where, value=c)
            else:
                if is_sub and a is None:
                    self._fail("constant - image", where)
                self.add_node("add_public", [node], out, where, value=-c if is_sub else c)
            return
        if func in (torch.cat, torch.concat):
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            nodes = [self.node_of(t) for t in tensors]
            if any(n is None for n in nodes):
                self._fail("cat", where, "concatenation with a constant tensor")
            dim = int(dim) % out.dim()
            if dim == 0:
                self._fail(f"cat(dim={dim})", where, "it concatenates along the batch")
            self.add_node("concat", nodes, out, where, **({} if dim == 1 else {"dim": dim}))
            return
        if func in _RELU_FUNCS:
            self.add_node("activation", [src], out, where,
                          block_sizes=np.ones((out.shape[1], 2), np.int32), functional=True)
            return
        if func in (F.relu6, F.hardtanh, F.hardtanh_) or func in _CLAMP_FUNCS:
            return self._clamp(func, args, kwargs, out, src, where)
        if func in _APPROX_FUNCS:
            if func is F.gelu and kwargs.get("approximate", "none") not in ("none", "tanh"):
                self._fail("F.gelu", where, f"approximate={kwargs['approximate']!r}")
            return self.add_node("approx", [src], out, where, function=_APPROX_FUNCS[func])
        if func in (F.hardsigmoid, F.hardswish):
            op = "hardsigmoid" if func is F.hardsigmoid else "hardswish"
            return self.add_node(op, [src], out, where)
        if func in _DIV_FUNCS:
            y = args[1] if len(args) > 1 else kwargs.get("other")
            if src is None or self.node_of(y) is not None or kwargs.get("rounding_mode"):
                self._fail(_fname(func), where, "only division of an image-dependent tensor by "
                           "a public constant is supported")
            c = 1.0 / torch.as_tensor(y, dtype=torch.float64).detach().cpu()
            return self.add_node("mul_public", [src], out, where, value=c)
        if func in _RESHAPE_FUNCS:
            return self._reshape(out, src, x, where)
        if func in _PERMUTE_FUNCS or func in _TRANSPOSE_FUNCS:
            if func in _PERMUTE_FUNCS:
                dims = args[1:] if len(args) > 1 else kwargs["dims"]
                if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                    dims = dims[0]
                dims = [int(d) % x.dim() for d in dims]
            else:
                d0, d1 = (int(d) % x.dim() for d in args[1:3])
                dims = list(range(x.dim()))
                dims[d0], dims[d1] = dims[d1], dims[d0]
            if dims[0] != 0:
                self._fail(_fname(func), where, f"dims {dims} move the batch dimension")
            if dims == list(range(x.dim())):
                return self._alias(out, src, x)
            return self.add_node("permute", [src], out, where, dims=tuple(dims))
        if func is torch.Tensor.__getitem__:
            return self._getitem(args[1], out, src, x, where)
        if func in _REFUSED:
            self._fail(_fname(func), where, _REFUSED[func])
        if func is F.interpolate:
            names = ["size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                     "antialias"]
            kw = dict(zip(names, args[1:]))
            kw.update(kwargs)
            kw.setdefault("mode", "nearest")
            if kw.get("antialias"):
                self._fail("interpolate(antialias=True)", where)
            return self._resize(out, src, x, where, kw["mode"], kw.get("align_corners"), kw)
        if func is F.adaptive_avg_pool2d:
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            return self._adaptive_avg(out, src, x, where, size)
        if func in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            if kwargs.get("return_indices") or (len(args) > 2 and args[2]) or \
                    func is F.adaptive_max_pool2d_with_indices:
                self._fail("adaptive_max_pool2d(return_indices=True)", where)
            return self._adaptive_max(out, src, x, where, size)
        if func is F.avg_pool2d:
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override"]
            kw = dict(zip(names, args[1:]))
            kw.update(kwargs)
            return self._avg_pool(out, src, x, where, kw["kernel_size"], kw.get("stride"),
                                  kw.get("padding", 0), kw.get("ceil_mode", False),
                                  kw.get("count_include_pad", True), kw.get("divisor_override"))
        if func is F.max_pool2d:
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
            kw = dict(zip(names, args[1:]))
            kw.update(kwargs)
            if _pair(kw.get("dilation", 1)) != (1, 1) or kw.get("return_indices"):
                self._fail("max_pool2d(dilation/return_indices)", where)
            return self._max_pool(out, src, where, kw["kernel_size"], kw.get("stride"),
                                  kw.get("padding", 0), bool(kw.get("ceil_mode", False)))
        if func in (torch.mean, torch.Tensor.mean):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            if x.dim() == 4 and dims is not None and \
                    sorted(d % 4 for d in (dims if isinstance(dims, (list, tuple)) else [dims])) == [2, 3]:
                self.add_node("global_avg_pool", [src], out, where, keepdim=bool(keep))
                return
            self._fail(_fname(func), where, f"mean over dims {dims}")
        self._fail(_fname(func), where)

    def _getitem(self, key, out, src, x, where):
        """Basic slicing x[:, a:b, ...] (unit steps, the batch dimension whole): one slice
        layer per sliced dimension."""
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (x.dim() - len(key) + 1) + key[i + 1:]
        if not key or len(key) > x.dim() or not all(isinstance(k, slice) for k in key) or \
                key[0] != slice(None):
            self._fail("Tensor.__getitem__", where, "only slices with unit steps on dimensions "
                       "after the batch are supported")
        node, cur = src, x
        for dim, k in enumerate(key):
            start, stop, step = k.indices(cur.shape[dim])
            if step != 1:
                self._fail("Tensor.__getitem__", where, "a slice with a step")
            if (start, stop) == (0, cur.shape[dim]):
                continue
            nxt = cur.narrow(dim, start, max(stop - start, 0))
            node = self.add_node("slice", [node], nxt, where, dim=dim, start=start,
                                 length=int(nxt.shape[dim]))
            cur = nxt
        if node == src:
            return self._alias(out, src, x)
        self.producer[id(out)] = node
        self.keep.append(out)

    def _clamp(self, func, args, kwargs, out, src, where):
        """hardtanh / ReLU6 / clamp: a ReLU6 (bounds 0 and 6, as the site tracer counts it) is
        an activation site; other bounds a clamp layer."""
        if func is F.relu6:
            lo, hi = 0.0, 6.0
        elif func in (F.hardtanh, F.hardtanh_):
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        elif func in (torch.clamp_min, torch.Tensor.clamp_min, torch.Tensor.clamp_min_):
            lo, hi = (args[1] if len(args) > 1 else kwargs.get("min")), None
        elif func in (torch.clamp_max, torch.Tensor.clamp_max, torch.Tensor.clamp_max_):
            lo, hi = None, (args[1] if len(args) > 1 else kwargs.get("max"))
        else:
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
        if any(isinstance(b, torch.Tensor) for b in (lo, hi)):
            self._fail(_fname(func), where, "tensor bounds")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        if lo is None and hi is None:
            return self._alias(out, src, args[0])
        if func in (F.relu6, F.hardtanh, F.hardtanh_) and (lo, hi) == (0.0, 6.0):
            return self.add_node("activation", [src], out, where, functional=True, clip=6.0,
                                 block_sizes=np.ones((out.shape[1], 2), np.int32))
        if lo is not None and hi is not None and not lo < hi:
            self._fail(_fname(func), where, f"bounds {lo} >= {hi}")
        return self.add_node("clamp", [src], out, where, lo=lo, hi=hi)


def _fname(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", "") or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{getattr(func, '__name__', name)}"
    owner, _, short = name.rpartition(".")
    if owner in ("_VariableFunctionsClass", "_C._VariableFunctions", "_TensorBase",
                 "TensorBase"):
        # torch's C bindings: name them as the user wrote them (torch.sigmoid, Tensor.sigmoid)
        return f"torch.{short}" if owner.startswith("_V") or owner.startswith("_C") \
            else f"Tensor.{short}"
    return name if "." in name else f"torch.{name}"


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    return t if len(t) == 2 else (t[0], t[0])


def _pair_none(v, default: tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (default[0] if a is None else int(a), default[1] if b is None else int(b))


def _same_padding(module: nn.Conv2d, shape) -> tuple[int, int]:
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            raise UnsupportedOperationError(f"Conv2d padding='same' with an asymmetric padding "
                                            f"at kernel {module.kernel_size}")
        pads.append(total // 2)
    return tuple(pads)


def pool_matrices(in_hw: tuple[int, int], pool, kwargs: dict[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The public matrices Mh [H_out, H], Mw [W_out, W] of a separable average pooling:
    ``pool(x, **kwargs) == Mh @ x @ Mw.T`` (F.adaptive_avg_pool2d, or F.avg_pool2d whose
    windows, divisors included, factor into rows and columns: ceil mode). Found by pooling
    basis images of one row (or column) with the other axis's window and divisor set to 1."""
    h, w = in_hw
    mats = []
    for axis, n in ((0, h), (1, w)):
        basis = torch.eye(n, dtype=torch.float64).view(n, 1, n, 1)
        kw = dict(kwargs)
        if pool is F.adaptive_avg_pool2d:
            kw["output_size"] = (kw["output_size"][axis], 1)
        else:
            for key in ("kernel_size", "stride", "padding"):
                kw[key] = (kw[key][axis], 1 if key != "padding" else 0)
            if kw.get("divisor_override"):   # the whole divisor on the row matrix
                kw["divisor_override"] = kw["divisor_override"] if axis == 0 else 1
        mats.append(pool(basis, **kw)[:, 0, :, 0].T.contiguous())
    return mats[0], mats[1]


def resize_matrices(in_hw: tuple[int, int], kwargs: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The public matrices Mh [H_out, H_in], Mw [W_out, W_in] of a separable resize:
    ``F.interpolate(x, **kwargs) == Mh @ x @ Mw.T`` (bilinear and nearest are separable).

    Found by resizing basis images in float64 with the same arguments.
    """
    h, w = in_hw
    kw = {k: v for k, v in kwargs.items() if k in ("size", "scale_factor", "mode",
                                                   "align_corners", "recompute_scale_factor")}
    if kw.get("mode") == "nearest":
        kw.pop("align_corners", None)
    rows = torch.zeros(h, 1, h, w, dtype=torch.float64)
    rows[torch.arange(h), 0, torch.arange(h), :] = 1.0
    cols = torch.zeros(w, 1, h, w, dtype=torch.float64)
    cols[torch.arange(w), 0, :, torch.arange(w)] = 1.0
    mh = F.interpolate(rows, **kw)[:, 0, :, 0].T.contiguous()   # [H_out, h]
    mw = F.interpolate(cols, **kw)[:, 0, 0, :].T.contiguous()   # [W_out, w]
    return mh, mw


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------

def compile_model(model: nn.Module, input_shape: Sequence[int], *,
                  spec: dict | None = None, calibration: Calibration | None = None,
                  frac_bits: int = DEFAULT_FRAC_BITS, drelu_width: int | None = None,
                  margin: float | None = None) -> tuple[Program, Weights]:
    """Trace ``model`` for inputs of ``input_shape`` ([N, C, H, W] or [C, H, W]) into a
    :class:`Program` (public) and its :class:`Weights` (the server's).

    ``spec`` (optional) is applied with :func:`secure_inference.apply_block_spec` to a copy
    of the model first; a model that already carries Block-ReLUs is compiled as it is.
    MMLab models run in ``mode='tensor'`` (classifier logits, segmentor decode-head logits).
    Raises :class:`UnsupportedOperationError` for anything the secure runtime cannot run.

    Comparison widths: with a ``calibration`` (default: the one a calibrated ``spec``
    carries, see :func:`~.calibrate.calibrate`), every calibrated DReLU layer gets the smallest
    exact width that holds its recorded range times ``margin`` (default: the calibration's)
    at ``frac_bits`` (:func:`secure_inference.widths.comparison_width`); uncalibrated layers
    keep the session's DReLU (64 bits). ``drelu_width=64`` ignores the calibration (today's
    programs); another ``drelu_width`` gives every DReLU layer that width (the caller vouches
    for the range). Widths are part of the program and its fingerprint.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"input_shape must be [N, C, H, W] or [C, H, W], got {input_shape}")
    if calibration is None:
        calibration = spec_calibration(spec)
    if spec:
        model = apply_block_spec(copy.deepcopy(model), spec, shape[1:])
    was_training = model.training
    model.eval()
    try:
        sites = find_relu_sites(model, shape)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x = torch.randn(shape, device=device)
        tracer = _Tracer(model)
        tracer.add_node("input", [], x, "<input>")
        try:
            with torch.no_grad(), tracer:
                out = run_model(model, x)
        finally:
            tracer.remove()
    finally:
        model.train(was_training)
    if isinstance(out, (list, tuple)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise UnsupportedOperationError(f"the model returns {type(out).__name__}; the secure "
                                        "runtime needs one output tensor")
    out_node = tracer.node_of(out)
    if out_node is None:
        raise UnsupportedOperationError("the model output does not depend on the input")
    program, weights = _lower(tracer.nodes, out_node, sites, shape)
    assign_widths(program, calibration, frac_bits=frac_bits, drelu_width=drelu_width,
                  margin=margin)
    return program, weights


def assign_widths(program: Program, calibration: Calibration | None, *, frac_bits: int,
                  drelu_width: int | None = None, margin: float | None = None) -> None:
    """Set every DReLU layer's comparison width (see :func:`compile_model`) in place, and the
    low bits a calibrated ReLU layer drops where the calibration chose some
    (:mod:`.dropped_bits`; never with an explicit ``drelu_width``)."""
    for layer in program.layers:
        layer.attrs.pop(WIDTH_ATTR, None)
        layer.attrs.pop(DROP_ATTR, None)
    program.frac_bits = None
    if drelu_width is not None:
        width = int(drelu_width)
        if not 3 <= width <= FULL_WIDTH:
            raise ValueError(f"drelu_width must be in [3, 64], got {drelu_width}")
        if width == FULL_WIDTH:
            return
        for layer in program.layers:
            if layer_drelus(layer):
                layer.attrs[WIDTH_ATTR] = width
        return
    if calibration is None:
        return
    dr_layers = {layer.name: layer for layer in program.layers if layer_drelus(layer)}
    unknown = [name for name in calibration.ranges if name not in dr_layers]
    if unknown:
        raise CalibrationError(
            f"the calibration names {len(unknown)} DReLU layer(s) this program does not have "
            f"(e.g. '{unknown[0]}'; the program's DReLU layers: {list(dr_layers)[:4]}...): it was "
            "made for another model, spec or input size; recalibrate with si-calibrate")
    for name, layer in dr_layers.items():
        width = calibration.width(name, frac_bits, margin)
        if name in calibration.ranges and width < FULL_WIDTH:
            layer.attrs[WIDTH_ATTR] = width
            drop = min(calibration.drop(name, frac_bits), width - MIN_WIDTH)
            if drop > 0 and layer.op == "relu":
                layer.attrs[DROP_ATTR] = drop
    program.frac_bits = int(frac_bits)


def _lower(nodes: list[dict], out_node: int, sites, shape) -> tuple[Program, Weights]:
    """Fold BN, drop dead layers, name layers, attach site names; build Program + Weights."""
    consumers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, n in enumerate(nodes):
        for j in n["inputs"]:
            consumers[j].append(i)
    # liveness: only layers that reach the output
    live = set()
    stack = [out_node]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(nodes[i]["inputs"])
    # activation layers <-> sites (in call order)
    acts = [i for i, n in enumerate(nodes) if n["op"] == "activation"]
    if len(acts) != len(sites):
        raise UnsupportedOperationError(
            f"found {len(acts)} activation calls but {len(sites)} ReLU sites; an activation "
            "is called in a way the compiler does not follow")
    site_of = {i: s for i, s in zip(acts, sites)}
    redirect: dict[int, int] = {}
    folded: dict[int, nn.Module] = {}
    for i, n in enumerate(nodes):
        if n["op"] == "batchnorm" and i in live:
            j = n["inputs"][0]
            if nodes[j]["op"] in ("conv2d", "linear") and consumers[j] == [i] and j not in folded:
                folded[j] = n["module"]
                redirect[i] = j
    layers: list[Layer] = []
    weights: Weights = {}
    index: dict[int, int] = {}
    used_names: dict[str, int] = {}

    def unique(name: str) -> str:
        name = name.replace("/", ".") or "layer"
        k = used_names.get(name, 0)
        used_names[name] = k + 1
        return name if k == 0 else f"{name}#{k}"

    def resolve(j: int) -> int:
        while j in redirect:
            j = redirect[j]
        return index[j]

    for i, n in enumerate(nodes):
        if i not in live or i in redirect:
            if i in redirect:
                index[i] = index[redirect[i]]
            continue
        op, attrs, where = n["op"], dict(n["attrs"]), n["where"]
        inputs = [resolve(j) for j in n["inputs"]]
        base = where.split(" (")[0]
        if op in ("conv2d", "linear"):
            m = n["module"]
            w = m.weight.detach().double().cpu()
            b = m.bias.detach().double().cpu() if m.bias is not None else None
            if i in folded:
                w, b = fold_bn(w, b, folded[i])
                w, b = w.cpu(), b.cpu()
            name = unique(base)
            weights[name] = {"weight": w, "bias": b}
        elif op == "batchnorm":  # not after a conv: a depthwise 1x1 convolution
            bn = n["module"]
            ch = bn.num_features
            if len(n["shape"]) != 4:
                raise UnsupportedOperationError(f"BatchNorm1d at '{where}' not after a Linear")
            w, b = fold_bn(torch.ones(ch, 1, 1, 1, dtype=torch.float64), None, bn)
            op = "conv2d"
            attrs = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=ch,
                         weight_shape=(ch, 1, 1, 1))
            name = unique(base)
            weights[name] = {"weight": w.cpu(), "bias": b.cpu()}
        elif op == "activation":
            site = site_of[i]
            sizes = as_block_sizes(attrs["block_sizes"], channels=site.channels)
            if np.all((sizes[:, 0] == 0) | (sizes[:, 1] == 0)):
                index[i] = inputs[0]   # identity site: no layer at all
                continue
            if "clip" in attrs and np.all(sizes == 1):   # a ReLU6 site, all ReLU6
                op, attrs = "clamp", {"lo": 0.0, "hi": float(attrs["clip"]), "site": site.name}
            elif "clip" in attrs:   # a ReLU6 site with a spec: Block-ReLU6
                op, attrs = "block_relu6", {"block_sizes": sizes, "site": site.name}
            else:
                op = "relu" if np.all(sizes == 1) else "block_relu"
                attrs = {"block_sizes": sizes, "site": site.name}
            name = unique(site.name)
        else:
            name = unique(f"{base}.{op}" if base != "<input>" else "input")
        layers.append(Layer(name=name, op=op, inputs=inputs, attrs=attrs, where=where,
                            shape=tuple(n["shape"])))
        index[i] = len(layers) - 1
    program = Program(layers=layers, output=resolve(out_node), input_shape=tuple(shape))
    return program, weights
