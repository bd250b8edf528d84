"""Distortion at ReLU6 sites: the channel becomes a Block-ReLU6 of the candidate size; the
engines agree with each other and with an independent whole-network reference, [1, 1] is the
unchanged ReLU6, and every option costs two DReLUs per patch."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from helpers.data import random_images
from helpers.nets import tiny_mobilenet
from secure_inference import apply_block_spec, block_costs, find_relu_sites
from secure_inference.distortion import extract, load_site, save_site
from secure_inference.distortion.store import SiteDistortion

SMALL = dict(max_rect=2, max_block_size=3)
SHAPE = (3, 8, 8)


def _samples(n=4, seed=1):
    return random_images(n, SHAPE[1], seed)


def _whole_network(model, x, site_name, channel, size) -> float:
    """The model with only (site, channel) set to ``size`` through apply_block_spec."""
    site = {s.name: s for s in find_relu_sites(model, SHAPE)}[site_name]
    rows = np.ones((site.channels, 2), np.int32)
    rows[channel] = size
    net = apply_block_spec(copy.deepcopy(model), {site_name: rows}, SHAPE).eval()
    with torch.no_grad():
        y0, y1 = model(x).double(), net(x).double()
    return float((y1 - y0).pow(2).mean(dim=1).mean())


def test_exact_and_naive_agree_at_relu6_sites_and_costs_count_two_drelus_per_patch():
    net = tiny_mobilenet(0)
    x = _samples()
    exact = extract(net, x, batch_size=3, forward_batch=5, **SMALL)
    naive = extract(net, x, batch_size=2, method="naive", **SMALL)
    assert list(exact) == list(naive) == [s.name for s in find_relu_sites(net, SHAPE)]
    activations = {name: r.activation for name, r in exact.items()}
    assert activations == {"stem.2": "relu6", "block1.expand.2": "relu6",
                           "block1.dw.2": "relu6", "block2.expand.2": "relu6",
                           "block2.dw.2": "relu6", "head.1": "relu"}
    for name, r in exact.items():
        # float32 forwards: differences of outputs ~100 carry rounding of ~1e-5 relative to
        # the site's largest distortion
        np.testing.assert_allclose(r.distortion, naive[name].distortion, rtol=1e-5,
                                   atol=1e-5 * r.distortion.max(), err_msg=name)
        k = 2 if r.activation == "relu6" else 1
        np.testing.assert_array_equal(r.costs, k * block_costs(r.block_sizes, r.height, r.width))
        assert tuple(r.block_sizes[0]) == (1, 1)
        assert np.all(r.distortion[:, 0] == 0), name   # [1, 1]: the site's own activation
        assert r.distortion[:, 1:].max() > 1e-6, name


def test_exact_matches_independent_whole_network_reference_at_relu6_sites():
    net = tiny_mobilenet(2)
    x = _samples(3, seed=4)
    names = ["stem.2", "block1.dw.2", "block2.dw.2"]
    res = extract(net, x, sites=names, **SMALL)
    checked = 0
    for name in names:
        r = res[name]
        tol = 1e-5 * r.distortion.max()   # float32 forwards (see above)
        for ch in range(0, r.channels, 3):
            for k in range(1, len(r.block_sizes)):
                ref = _whole_network(net, x, name, ch, r.block_sizes[k])
                assert r.distortion[ch, k] == pytest.approx(ref, rel=1e-5, abs=tol)
                checked += ref > 0
    assert checked > 20


def test_linear_estimate_ranks_like_exact_at_relu6_sites():
    net = tiny_mobilenet(1)
    x = _samples(6, seed=2)
    exact = extract(net, x, sites=["block1.expand.2"], **SMALL)["block1.expand.2"]
    linear = extract(net, x, sites=["block1.expand.2"], method="linear", num_projections=64,
                     **SMALL)["block1.expand.2"]
    assert linear.activation == "relu6"
    np.testing.assert_array_equal(linear.costs, exact.costs)
    assert np.all(linear.distortion[:, 0] == 0)
    rho = spearmanr(exact.distortion[:, 1:].ravel(), linear.distortion[:, 1:].ravel())[0]
    assert rho > 0.8


def test_site_files_keep_the_activation(tmp_path):
    r = SiteDistortion(site="a", distortion=np.zeros((2, 2)),
                       block_sizes=np.array([[1, 1], [2, 2]], np.int32),
                       costs=np.array([32, 8]), channels=2, height=4, width=4, num_samples=1,
                       seed=0, activation="relu6")
    assert load_site(save_site(tmp_path, r)).activation == "relu6"
    old = tmp_path / "old.npz"   # a file written before sites had an activation
    np.savez(old, site=np.array("a"), distortion=r.distortion, block_sizes=r.block_sizes,
             costs=np.array([16, 4]), channels=2, height=4, width=4, num_samples=1, seed=0)
    assert load_site(old).activation == "relu"
