"""Small networks for the distortion tests: residual adds, a ReLU module called twice,
a skip connection reading a site's input, an in-place ReLU and a ReLU after a linear layer;
a MobileNetV2-like net whose activations are ReLU6 (plus one ReLU)."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """BasicBlock-like: one ReLU module called at two sites, in-place residual add."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                   nn.BatchNorm2d(c_out)) if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class PreSkip(nn.Module):
    """The site's INPUT also feeds a skip connection: only the output may change."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(c, c, 1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        h = self.conv0(x)
        return self.conv(self.act(h)) + h


class TinyResNet(nn.Module):
    def __init__(self, width: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = Block(width, width)
        self.pre = PreSkip(width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(2 * width, 8)
        self.fc_relu = nn.ReLU()
        self.fc2 = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.layer2(self.pre(self.layer1(self.stem(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.fc_relu(self.fc1(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, ReLU6, depthwise 3x3, ReLU6, 1x1 projection, and the
    residual add when the shape allows."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 3) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self, width: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU6(inplace=True))
        self.block1 = InvertedResidual(width, width, 1)
        self.block2 = InvertedResidual(width, 2 * width, 2)
        self.head = nn.Sequential(nn.Conv2d(2 * width, 8, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def init_net(net: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights and non-trivial BN statistics (so BN is not the identity); eval
    mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net.eval()


def tiny_resnet(seed: int = 0, width: int = 4) -> TinyResNet:
    """Deterministically initialised TinyResNet with non-trivial BN statistics, in eval mode."""
    return init_net(TinyResNet(width), seed)


def tiny_mobilenet(seed: int = 0, width: int = 4, gain: float = 2.0) -> TinyMobileNet:
    """Deterministically initialised TinyMobileNet (convolutions scaled by ``gain`` so that
    many pre-activations exceed 6), in eval mode."""
    net = init_net(TinyMobileNet(width), seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(gain)
    return net


def factory() -> TinyResNet:
    """``module:factory`` entry for the CLI tests."""
    return tiny_resnet(0)
