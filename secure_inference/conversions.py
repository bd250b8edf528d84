"""Architecture conversions used by the reference tasks (in place; each returns the model).

* MaxPool→AvgPool (ResNet50 ImageNet): max pooling needs a tree of comparisons under secure
  computation, average pooling is linear and free.
* ReLU6→ReLU (DeepLabV3-MobileNetV2 ADE20K): Block-ReLU has no upper clip.

Also :func:`fold_bn`, the one BatchNorm folding both the distortion engine and the secure
compiler use.
"""
from __future__ import annotations

import torch
from torch import nn


def _replace_modules(model: nn.Module, match, build) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, build(child))
                count += 1
    return count


def maxpool_to_avgpool(model: nn.Module) -> nn.Module:
    """Replace every nn.MaxPool2d by nn.AvgPool2d with the same kernel, stride and padding.

    ``count_include_pad=True`` keeps the pooling a fixed public linear map (padding counts as
    zeros), which is what the secure runtime computes. Dilated or ceil-mode max pools are
    refused rather than approximated.
    """
    def build(m: nn.MaxPool2d) -> nn.AvgPool2d:
        if m.dilation not in (1, (1, 1)):
            raise ValueError(f"cannot convert a dilated MaxPool2d ({m}) to AvgPool2d")
        return nn.AvgPool2d(m.kernel_size, stride=m.stride, padding=m.padding,
                             ceil_mode=m.ceil_mode, count_include_pad=True)

    _replace_modules(model, lambda m: isinstance(m, nn.MaxPool2d), build)
    return model


def relu6_to_relu(model: nn.Module) -> nn.Module:
    """Replace every nn.ReLU6 by nn.ReLU (keeping ``inplace``)."""
    _replace_modules(model, lambda m: isinstance(m, nn.ReLU6),
                     lambda m: nn.ReLU(inplace=m.inplace))
    return model


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64 of the conv/linear layer equal to ``bn(layer(x))`` with an
    eval-mode BatchNorm: w·g/sqrt(var + eps) and (b − mean)·g/sqrt(var + eps) + beta (a
    missing bias is 0; a BatchNorm without affine parameters has g = 1, beta = 0)."""
    w = weight.detach().double()
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return w * scale.reshape(-1, *([1] * (w.dim() - 1))), shift
