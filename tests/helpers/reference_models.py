"""The four reference architectures at reduced width (same layer types and control flow),
with non-trivial BN statistics and a knapsack-like mixed spec: the models the compiler and
secure-inference tests check end to end."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import secure_inference as si
from model_zoo import build_classifier, build_deeplabv3
from secure_inference.sites import find_relu_sites

def resnet18_cifar(width: int = 16, num_classes: int = 100) -> nn.Module:
    """mmpretrain ResNet18-CIFAR (ImageClassifier, ResNet_CIFAR, GAP neck, linear head)."""
    return build_classifier(dict(type="ResNet_CIFAR", depth=18, num_stages=4, out_indices=(3,),
                                 style="pytorch", stem_channels=width, base_channels=width),
                            8 * width, num_classes).eval()


def resnet50(width: int = 8, num_classes: int = 10) -> nn.Module:
    """mmpretrain ResNet50 (bottlenecks, max-pool stem)."""
    return build_classifier(dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,),
                                 style="pytorch", stem_channels=width, base_channels=width),
                            32 * width, num_classes).eval()


def _deeplab(backbone: dict, in_channels: int, channels: int, num_classes: int) -> nn.Module:
    return build_deeplabv3(backbone, in_channels, channels, num_classes).eval()


def deeplabv3_r50(width: int = 8, num_classes: int = 5) -> nn.Module:
    """mmseg DeepLabV3 with ResNetV1c-50 (deep stem, dilated stages) and the ASPP head."""
    bb = dict(type="ResNetV1c", depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
              dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), stem_channels=width,
              base_channels=width, norm_cfg=dict(type="BN", requires_grad=True),
              norm_eval=False, style="pytorch", contract_dilation=True)
    return _deeplab(bb, 32 * width, 16, num_classes)


def deeplabv3_mobilenetv2(widen: float = 0.25, num_classes: int = 5) -> nn.Module:
    """mmseg DeepLabV3 with MobileNetV2 (depthwise convs, inverted residuals), ReLU6→ReLU."""
    bb = dict(type="MobileNetV2", widen_factor=widen, strides=(1, 2, 2, 1, 1, 1, 1),
              dilations=(1, 1, 1, 2, 2, 4, 4), out_indices=(1, 2, 4, 6),
              norm_cfg=dict(type="BN", requires_grad=True))
    model = _deeplab(bb, int(320 * widen), 16, num_classes)
    return si.relu6_to_relu(model)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics (fresh models have mean 0, var 1: folding would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model


def mixed_spec(model: nn.Module, input_shape, seed: int = 0) -> dict:
    """A spec over every other site: per channel a random choice of ReLU, identity, 2×2,
    1×3, 3×3 and 4×2 patches (what a knapsack solution looks like)."""
    rng = np.random.default_rng(seed)
    choices = np.array([[1, 1], [0, 1], [2, 2], [1, 3], [3, 3], [4, 2]], np.int32)
    spec = {}
    for i, site in enumerate(find_relu_sites(model, input_shape)):
        if i % 2 == 0 and not site.functional:
            spec[site.name] = choices[rng.integers(0, len(choices), site.channels)]
    return spec


REFERENCE = {
    "resnet18_cifar": (resnet18_cifar, (3, 32, 32)),
    "resnet50": (resnet50, (3, 32, 32)),
    "deeplabv3_r50": (deeplabv3_r50, (3, 32, 32)),
    "deeplabv3_mobilenetv2": (deeplabv3_mobilenetv2, (3, 32, 32)),
}


def build_reference(name: str, spec: bool = True, seed: int = 0):
    """(plaintext Block-ReLU model, spec, input CHW) for a reduced reference architecture."""
    torch.manual_seed(seed)
    build, chw = REFERENCE[name]
    model = randomize_bn(build(), seed)
    sp = mixed_spec(model, chw, seed) if spec else {}
    return model, sp, chw
