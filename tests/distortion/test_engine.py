"""The exact and linear engines against the naive one-candidate-at-a-time reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from helpers.data import random_images
from helpers.nets import tiny_resnet
from secure_inference import apply_block_spec, find_relu_sites
from secure_inference.distortion import DistortionError, extract
from secure_inference.distortion.calls import trace_calls
from secure_inference.distortion.exact import exact_site_sums
from secure_inference.distortion.naive import naive_site_sums

SMALL = dict(max_rect=2, max_block_size=3)  # 6 candidates per 8x8 site: fast naive reference


def _samples(n=5, seed=1, hw=8):
    return random_images(n, hw, seed)


def _plain_reference(model, x, site_name, channel, size):
    """Independent reference: rebuild the network with one Block-ReLU channel via
    apply_block_spec and compare whole forwards (no engine code involved)."""
    import copy
    shape = tuple(x.shape[1:])
    site = {s.name: s for s in find_relu_sites(model, shape)}[site_name]
    rows = np.ones((site.channels, 2), np.int32)
    rows[channel] = size
    net = apply_block_spec(copy.deepcopy(model), {site_name: rows}, shape).eval()
    with torch.no_grad():
        y0, y1 = model(x).double(), net(x).double()
    return float((y1 - y0).pow(2).mean(dim=1).mean())


def test_exact_equals_naive_on_residual_net_with_shared_relu():
    net = tiny_resnet(0)
    x = _samples()
    # batches of 3 and 2 samples; 5 rows per batched forward: row batches cross candidates
    exact = extract(net, x, batch_size=3, forward_batch=5, **SMALL)
    naive = extract(net, x, batch_size=2, method="naive", **SMALL)
    assert list(exact) == list(naive)
    assert {"layer1.relu#0", "layer1.relu#1", "layer2.relu#1", "pre.act", "fc_relu"} <= set(exact)
    for name in exact:
        a, b = exact[name].distortion, naive[name].distortion
        assert a.shape == b.shape == (exact[name].channels, len(exact[name].block_sizes))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9, err_msg=name)
        assert b.max() > 1e-6, name  # every site of this net is sensitive
    # ordinary ReLU costs nothing; a non-trivial candidate does
    assert np.all(exact["layer1.relu#0"].distortion[:, 0] == 0)
    assert np.all(exact["layer1.relu#0"].distortion[:, -1] > 0)


def test_exact_matches_independent_whole_network_reference():
    net = tiny_resnet(3)
    x = _samples(4, seed=2)
    res = extract(net, x, sites=["layer1.relu#1", "pre.act", "layer2.relu#0"], **SMALL)
    for name, ch, k in [("layer1.relu#1", 2, 3), ("pre.act", 1, 5), ("layer2.relu#0", 7, 2)]:
        size = res[name].block_sizes[k]
        ref = _plain_reference(net, x, name, ch, size)
        assert ref > 0
        assert res[name].distortion[ch, k] == pytest.approx(ref, rel=1e-5)


def test_exact_on_model_with_applied_spec_multisite_module():
    """Sites already Block-ReLUs, a MultiSiteActivation module: clean = current model."""
    net = tiny_resnet(1)
    shape = (3, 8, 8)
    spec = {"layer1.relu#1": np.tile(np.array([[2, 2]], np.int32), (4, 1)),
            "layer2.relu#0": np.tile(np.array([[1, 2]], np.int32), (8, 1))}
    apply_block_spec(net, spec, shape)
    x = _samples(3, seed=5)
    names = ["layer1.relu#0", "layer1.relu#1", "layer2.relu#0", "layer2.relu#1"]
    exact = extract(net, x, sites=names, forward_batch=7, **SMALL)
    naive = extract(net, x, sites=names, method="naive", **SMALL)
    for name in names:
        np.testing.assert_allclose(exact[name].distortion, naive[name].distortion,
                                   rtol=1e-5, atol=1e-9, err_msg=name)
    # the candidate equal to the applied spec changes nothing
    k22 = [tuple(s) for s in exact["layer1.relu#1"].block_sizes].index((2, 2))
    assert np.all(exact["layer1.relu#1"].distortion[:, k22] == 0)


def test_torchvision_basicblock_sites():
    import torchvision
    torch.manual_seed(0)   # fixed weights: float32 summation order differs between the two
    net = torchvision.models.resnet18(num_classes=3).eval()   # methods (rtol 1e-5 holds here)
    x = _samples(2, seed=3, hw=16)
    site = {s.name: s for s in find_relu_sites(net, (3, 16, 16))}["layer1.0.relu#1"]
    sizes = np.array([[1, 1], [2, 2], [0, 1]], np.int32)
    calls = trace_calls(net, x[:1])
    a = exact_site_sums(net, calls, site, [x], [0, 5, 63], sizes, forward_batch=4)
    b = naive_site_sums(net, site, [x], [0, 5, 63], sizes, (3, 16, 16))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    assert a[:, 1:].max() > 0


class _LinearTail(nn.Module):
    """conv -> ReLU (site) -> conv -> flatten: the output is linear in the site's output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x))).flatten(1)


def test_linear_is_unbiased_when_the_rest_is_linear():
    net = _LinearTail().eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    exact = extract(net, x, **SMALL)["act"].distortion
    lin = extract(net, x, method="linear", num_projections=3000, seed=7, **SMALL)["act"].distortion
    assert exact.max() > 0
    np.testing.assert_allclose(lin, exact, rtol=0.15, atol=1e-3 * exact.max())
    # the seed is recorded and reproducible; another seed gives another estimate
    again = extract(net, x, method="linear", num_projections=3000, seed=7, **SMALL)["act"]
    assert np.array_equal(again.distortion, lin) and again.seed == 7


def test_linear_ranks_like_exact_on_small_resnet():
    net = tiny_resnet(0)
    x = _samples(6, seed=9)
    exact = extract(net, x, **SMALL)
    lin = extract(net, x, method="linear", num_projections=64, batch_size=3, **SMALL)
    rhos = []
    for name in exact:
        a, b = exact[name].distortion.ravel(), lin[name].distortion.ravel()
        assert np.all(b >= 0)
        if a.max() > 0:
            rhos.append(spearmanr(a, b)[0])
    assert np.median(rhos) > 0.8, rhos


def test_bad_input_errors():
    net = tiny_resnet(0)
    x = _samples(2)
    with pytest.raises(DistortionError, match="unknown site"):
        extract(net, x, sites=["layer9.relu"])
    with pytest.raises(DistortionError, match="unknown method"):
        extract(net, x, method="fast")
    bad = tiny_resnet(0)
    with torch.no_grad():
        bad.fc2.bias.fill_(float("nan"))
    with pytest.raises(DistortionError, match="NaN"):
        extract(bad, x, sites=["fc_relu"])
    with pytest.raises(DistortionError, match=r"\[N, C, H, W\]"):
        extract(net, torch.randn(3, 8, 8))


class _FunctionalRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return nn.functional.relu6(self.conv(x)).flatten(1)


def test_functional_relu6_site_refused_module_relu6_measured():
    net = _FunctionalRelu6()
    with pytest.raises(DistortionError, match="functional F.relu6"):
        extract(net, _samples(1), sites=[":relu6"])
    with pytest.raises(DistortionError, match="no replaceable"):
        extract(net, _samples(1))
    res = extract(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU6(), nn.Flatten()), _samples(1),
                  **SMALL)
    assert res["1"].activation == "relu6"


class _InplaceAfterSite(nn.Module):
    """An in-place non-linear op between the site and the conv reading it: the incremental
    conv update must not be used (conv(clamp(a + d)) != conv(clamp(a)) + conv(d))."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        a = self.act(self.conv0(x))
        a.clamp_(max=0.5)
        return self.conv1(a).flatten(1)


def test_incremental_conv_update_guarded_against_inplace_changes():
    from secure_inference.distortion.site_runner import SiteRunner
    net = _InplaceAfterSite().eval()
    x = _samples(3, seed=8)
    exact = extract(net, x, **SMALL)["act"].distortion
    naive = extract(net, x, method="naive", **SMALL)["act"].distortion
    np.testing.assert_allclose(exact, naive, rtol=1e-5, atol=1e-9)
    site = find_relu_sites(net, (3, 8, 8))[0]
    cap = SiteRunner(net, trace_calls(net, x[:1]), site).capture(x)
    assert cap.leaf_out is None
    # without the in-place op the update is used (and the tiny resnet tests check its values)
    plain = tiny_resnet(0)
    s = {t.name: t for t in find_relu_sites(plain, (3, 8, 8))}["layer1.relu#0"]
    assert SiteRunner(plain, trace_calls(plain, x[:1]), s).capture(x).leaf_out is not None


def test_exact_equals_naive_on_tiny_mmseg_deeplabv3():
    """Segmentation: decode-head logits, a backbone returning a tuple, ASPP branches that are
    concatenated, an image-pool branch with a 1x1 site."""
    import mmseg.models  # noqa: F401
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    norm = dict(type="BN", requires_grad=True)
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(dict(
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3),
            backbone=dict(type="ResNetV1c", depth=18, base_channels=8, stem_channels=8,
                          num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                          strides=(1, 2, 1, 1), norm_cfg=norm, contract_dilation=True,
                          init_cfg=None),
            decode_head=dict(type="ASPPHead", in_channels=64, in_index=3, channels=8,
                             dilations=(1, 2, 3, 4), dropout_ratio=0.1, num_classes=3,
                             norm_cfg=norm, align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False)),
            train_cfg=dict(), test_cfg=dict(mode="whole"))).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = ["decode_head.image_pool.1.activate",
             "decode_head.aspp_modules.2.activate", "decode_head.bottleneck.activate"]
    exact = extract(model, x, sites=names, max_rect=2, max_block_size=2)
    naive = extract(model, x, sites=names, max_rect=2, max_block_size=2, method="naive")
    assert exact["decode_head.image_pool.1.activate"].height == 1
    for name in names:
        np.testing.assert_allclose(exact[name].distortion, naive[name].distortion, rtol=1e-4,
                                   atol=1e-12, err_msg=name)
        assert naive[name].distortion.max() > 0, name
