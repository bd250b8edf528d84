"""ReLU sites: exact on the reference architectures, names stable and unique."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from secure_inference import find_relu_sites, relu6_to_relu, total_relus
from secure_inference.sites import run_model

from model_zoo import (mmpretrain_resnet18_cifar, mmpretrain_resnet50, mmseg_deeplabv3_mobilenetv2,
                        mmseg_deeplabv3_r50)


class AtenReluCounter(TorchDispatchMode):
    """Independent reference: counts relu-like ops at the aten dispatch level."""

    RELU_OPS = {"relu", "relu_", "hardtanh", "hardtanh_"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.RELU_OPS:
            self.calls.append(tuple(out.shape))
        return out


def reference_counts(model, input_shape):
    model.eval()
    counter = AtenReluCounter()
    with torch.no_grad(), counter:
        run_model(model, torch.randn(1, *input_shape))
    return len(counter.calls), sum(s[1] for s in counter.calls), sum(
        torch.Size(s[1:]).numel() for s in counter.calls)


def summary(sites):
    return len(sites), sum(s.channels for s in sites), total_relus(sites)


def test_resnet18_cifar_mmpretrain_known_counts():
    sites = find_relu_sites(mmpretrain_resnet18_cifar(), (3, 32, 32))
    assert summary(sites) == (17, 3904, 557056)
    names = [s.name for s in sites]
    assert len(set(names)) == len(names)
    assert names[:3] == ["backbone.relu", "backbone.layer1.0.relu#0", "backbone.layer1.0.relu#1"]


def test_resnet50_torchvision_known_counts():
    import torchvision
    model = torchvision.models.resnet50()
    assert summary(find_relu_sites(model, (3, 224, 224))) == (49, 22720, 9608704)


def test_resnet50_mmpretrain_known_counts():
    assert summary(find_relu_sites(mmpretrain_resnet50(), (3, 224, 224))) == (49, 22720, 9608704)


@pytest.mark.parametrize("name,shape", [("resnet18", (3, 64, 48)), ("mobilenet_v2", (3, 64, 64))])
def test_torchvision_models_match_dispatch_level_count(name, shape):
    import torchvision
    model = torchvision.models.get_model(name)
    assert summary(find_relu_sites(model, shape)) == reference_counts(model, shape)


@pytest.mark.parametrize("factory", [mmseg_deeplabv3_r50, mmseg_deeplabv3_mobilenetv2])
def test_mmseg_deeplabv3_matches_dispatch_level_count(factory):
    model = factory()
    shape = (3, 64, 64)
    sites = find_relu_sites(model, shape)
    assert summary(sites) == reference_counts(model, shape)
    assert any(s.name.startswith("decode_head.") for s in sites)
    assert len({s.name for s in sites}) == len(sites)


def test_mobilenet_relu6_sites_and_conversion():
    import torchvision
    model = torchvision.models.mobilenet_v2()
    sites = find_relu_sites(model, (3, 32, 32))
    assert {s.kind for s in sites} == {"ReLU6"}
    relu6_to_relu(model)
    converted = find_relu_sites(model, (3, 32, 32))
    assert {s.kind for s in converted} == {"ReLU"}
    assert [s.name for s in converted] == [s.name for s in sites]


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = torch.relu(x + 1)
        x = self.act(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x).relu()


def test_functional_calls_are_sites_in_forward_order():
    sites = find_relu_sites(Functional(), (3, 6, 5))
    assert [(s.name, s.kind, s.channels, s.height, s.width) for s in sites] == [
        (":relu#0", "F.relu", 4, 6, 5), (":relu#1", "F.relu", 4, 6, 5), ("act", "ReLU", 4, 6, 5),
        (":relu#2", "F.relu", 5, 1, 1)]


def test_shared_module_gives_distinct_sites_and_restores_mode():
    import torchvision
    model = torchvision.models.resnet18().train()
    sites = find_relu_sites(model, (3, 32, 32))
    assert model.training
    by_module = [s for s in sites if s.module_path == "layer1.0.relu"]
    assert [(s.name, s.call_index) for s in by_module] == [("layer1.0.relu#0", 0),
                                                          ("layer1.0.relu#1", 1)]


def test_names_are_stable_across_input_sizes():
    import torchvision
    model = torchvision.models.resnet18()
    a = find_relu_sites(model, (3, 32, 32))
    b = find_relu_sites(model, (3, 64, 80))
    assert [s.name for s in a] == [s.name for s in b]
    assert b[0].height == 32 and b[0].width == 40


def test_bad_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        find_relu_sites(nn.ReLU(), (32, 32))
