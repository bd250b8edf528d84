"""The model compiler (secure_inference.mpc.compile) against the torch models it compiles:
the compiled program run in float64 must reproduce the model (with its Block-ReLUs), on the
four reference architectures (reduced width: same layer types and control flow), torchvision,
and small models exercising every supported layer; unsupported operations are named."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secure_inference as si
from secure_inference.mpc.compile import (UnsupportedOperationError, compile_model, error_std,
                                          resize_matrices, run_float)
from secure_inference.sites import find_relu_sites, run_model
from helpers.reference_models import REFERENCE, build_reference, randomize_bn


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_architectures_compile_exactly(name):
    model, spec, chw = build_reference(name)
    shape = (2,) + chw
    program, weights = compile_model(model, shape, spec=spec)
    plain = si.apply_block_spec(model, spec, chw)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = run_model(plain, x).double()
    got = run_float(program, weights, x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))
    # every non-identity site is one layer carrying its name; DReLUs match the spec's count
    sites = find_relu_sites(plain, chw)
    counts = si.count_drelus(spec, sites)
    drelus = program.drelus(batch=1)
    for site in sites:
        layer = [l for l in program.layers if l.attrs.get("site") == site.name]
        if counts[site.name] == 0:
            assert not layer
        else:
            assert len(layer) == 1 and drelus[layer[0].name] == counts[site.name]
    # BN is folded away, dropout removed
    assert not {l.op for l in program.layers} & {"batchnorm", "activation"}
    # a batch of a different size runs through the same program
    x3 = torch.randn((3,) + chw)
    with torch.no_grad():
        ref3 = run_model(plain, x3).double()
    assert float((run_float(program, weights, x3) - ref3).abs().max()) <= \
        1e-5 * (1 + float(ref3.abs().max()))


def test_torchvision_resnet_and_program_holds_no_weights():
    import torchvision
    model = randomize_bn(torchvision.models.resnet18(num_classes=7)).eval()
    program, weights = compile_model(model, (1, 3, 40, 40))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = model(x).double()
    assert torch.allclose(run_float(program, weights, x), ref, atol=1e-4, rtol=1e-4)
    assert [l.op for l in program.layers].count("max_pool") == 1
    # the public program (what the client and helper get) carries no weight values
    blob = pickle.dumps(program)
    for wt in weights.values():
        raw = wt["weight"].numpy().tobytes()
        assert raw[:64] not in blob
    assert "weight" not in {k for l in program.layers for k in l.attrs}


class _Glue(nn.Module):
    """Functional glue between layers: F.relu, cat, mean, avg/adaptive pooling, resize,
    standalone BN, a public scale and offset, flatten by view."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False)
        self.b = nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0))
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2 + 8, 6)

    def forward(self, x):
        y = F.relu(self.a(x))
        z = F.interpolate(self.b(x), size=y.shape[-2:], mode="bilinear", align_corners=True)
        c = self.bn(torch.cat([y, z], dim=1))
        c = F.avg_pool2d(self.dw(c), 2, count_include_pad=False, padding=1) * 0.5 + 0.25
        c = F.interpolate(c, scale_factor=2, mode="nearest")
        g = c.mean(dim=(2, 3))
        return self.fc(torch.cat([self.pool(c).view(c.size(0), -1), g], dim=1))


def test_functional_glue_and_standalone_bn():
    torch.manual_seed(1)
    model = randomize_bn(_Glue()).eval()
    program, weights = compile_model(model, (2, 3, 9, 11))
    ops = [l.op for l in program.layers]
    for op in ("relu", "resize", "concat", "avg_pool", "mul_public", "add_public",
               "global_avg_pool", "flatten", "linear"):
        assert op in ops, op
    assert ops.count("conv2d") == 4  # a, b, the BN as a depthwise 1x1 conv, dw
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        ref = model(x).double()
    assert torch.allclose(run_float(program, weights, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(size=(7, 5), mode="bilinear", align_corners=False),
                                dict(size=(8, 12), mode="bilinear", align_corners=True),
                                dict(scale_factor=2.5, mode="bilinear", align_corners=False),
                                dict(size=(7, 9), mode="nearest"),
                                dict(size=(6, 6), mode="bilinear", align_corners=False)])
def test_resize_is_a_separable_public_map(kw):
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    mh, mw = resize_matrices((4, 6), kw)
    assert torch.allclose(mh @ x @ mw.T, F.interpolate(x, **kw), atol=1e-12)


def test_bn_folding_matches_conv_then_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    from secure_inference.mpc.compile import fold_bn
    w, b = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = bn.double()(conv.double()(x))
    assert torch.allclose(F.conv2d(x, w, b, padding=1), ref, atol=1e-12)


class _LayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.LayerNorm(8))

    def forward(self, x):
        return self.head(self.conv(x))


class _Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class _BatchPermute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU6())

    def forward(self, x):
        return self.block(x).transpose(0, 1)


@pytest.mark.parametrize("model,words", [
    (_LayerNorm(), ["layer_norm", "head.1", "inverse square root"]),
    (_Exp(), ["torch.exp", "<model>"]),
    (_BatchPermute(), ["transpose", "batch"]),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(2, dilation=2)), ["MaxPool2d", "'1'"]),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Upsample(scale_factor=2, mode="bicubic")),
     ["bicubic", "'1'"]),
])
def test_unsupported_operations_are_named_with_their_place(model, words):
    with pytest.raises(UnsupportedOperationError) as err:
        compile_model(model.eval(), (1, 3, 8, 8))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_error_analysis_is_small_and_scales_with_fractional_bits():
    model, spec, chw = build_reference("resnet18_cifar")
    program, weights = compile_model(model, (1,) + chw, spec=spec)
    x = torch.randn((1,) + chw)
    s16, _ = error_std(program, weights, x, 16)
    s12, _ = error_std(program, weights, x, 12)
    ratio = float(s12.max() / s16.max())
    assert 12 < ratio < 20  # errors scale with 2^-f (16x), up to the weights' share
    assert float(s16.max()) < 1e-3 * float(run_float(program, weights, x).abs().max()) + 1e-3
