"""Architecture conversions used by the reference tasks."""
import pytest
import torch
from torch import nn

from secure_inference import maxpool_to_avgpool, relu6_to_relu


def test_maxpool_to_avgpool_keeps_geometry_and_computes_the_average():
    import torchvision
    model = torchvision.models.resnet50()
    pool = model.maxpool
    maxpool_to_avgpool(model)
    new = model.maxpool
    assert isinstance(new, nn.AvgPool2d)
    assert (new.kernel_size, new.stride, new.padding) == (pool.kernel_size, pool.stride, pool.padding)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    x = torch.randn(1, 2, 5, 5)
    got = new(x)
    # reference: zero-padded sum over each 3x3 window / 9
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    ref = torch.stack([torch.stack([padded[..., 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum((-1, -2)) / 9
                                    for j in range(3)], -1) for i in range(3)], -2)
    torch.testing.assert_close(got, ref)


def test_dilated_maxpool_is_refused():
    with pytest.raises(ValueError, match="dilated"):
        maxpool_to_avgpool(nn.Sequential(nn.MaxPool2d(3, dilation=2)))


def test_relu6_to_relu():
    import torchvision
    model = torchvision.models.mobilenet_v2()
    n6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    relu6_to_relu(model)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 0
    assert sum(type(m) is nn.ReLU for m in model.modules()) == n6
    x = torch.tensor([[-1.0, 3.0, 9.0]])
    assert relu6_to_relu(nn.Sequential(nn.ReLU6()))(x).tolist() == [[0.0, 3.0, 9.0]]
