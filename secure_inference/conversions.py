"""Architecture conversions used by the reference tasks (in place; each returns the model).

* MaxPool→AvgPool (ResNet50 ImageNet): max pooling needs a tree of comparisons under secure
  computation, average pooling is linear and free.
* ReLU6→ReLU (DeepLabV3-MobileNetV2 ADE20K): Block-ReLU has no upper clip.
"""
from __future__ import annotations

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
