"""The knapsack at ReLU6 sites: options priced as Block-ReLU6 (two DReLUs per patch; bytes as
the runtime sends them), the chosen spec within budget, applied to the model and run securely
with exactly the bytes the knapsack counted; and the whole pipeline through the two command
lines on torchvision's mobilenet_v2 with its ReLU6 kept."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import secure_inference as si
from helpers.data import random_images
from helpers.nets import tiny_mobilenet
from helpers.reference_models import randomize_bn
from helpers.scripts import load_script
from secure_inference.distortion import DistortionFileError, extract, load_results
from secure_inference.distortion.store import SiteDistortion
from secure_inference.knapsack import (all_relu_bytes, all_relu_count, budget_from_ratio,
                                       check_against_sites, check_distortion_results,
                                       knapsack_block_spec, option_units, site_bytes,
                                       spec_site_bytes)
from secure_inference.mpc.compile import compile_model, error_bound
from secure_inference.mpc.local import run_local

SHAPE = (3, 8, 8)
SMALL = dict(max_rect=2, max_block_size=3)


def _plain_relu6_bytes(sizes, height, width, ell=64) -> int:
    """A Block-ReLU6 site counted message by message: per patch two comparisons (the dealt
    r' bits and two PrivateCompare messages, n(ℓ−1) values mod 67 each, five per 4-byte word;
    the opening both ways; the helper's 8-byte share), per non-identity pixel two payload
    values of 8 + 8 + 8 bytes."""
    n = m = 0
    for h, w in np.asarray(sizes).tolist():
        if h == 0 or w == 0:
            continue
        n += 2 * math.ceil(height / h) * math.ceil(width / w)
        m += 2 * height * width
    if n == 0:
        return 0
    return 3 * 4 * math.ceil(n * (ell - 1) / 5) + 2 * n * math.ceil(ell / 8) + 8 * n + 24 * m


def _site(activation: str) -> SiteDistortion:
    sizes = si.candidate_block_sizes(6, 5)
    k = 2 if activation == "relu6" else 1
    return SiteDistortion("s", np.ones((3, len(sizes))), sizes, k * si.candidate_costs(sizes, 6, 5),
                          3, 6, 5, num_samples=1, seed=0, activation=activation)


# ------------------------------------------------------------------ prices and checks

@pytest.mark.parametrize("ell", [8, 27, 64])
def test_relu6_options_cost_twice_a_relu_option(ell):
    relu, relu6 = _site("relu"), _site("relu6")
    np.testing.assert_array_equal(option_units(relu6, ell), 2 * option_units(relu, ell))
    rng = np.random.default_rng(ell)
    for _ in range(20):
        sizes = relu6.block_sizes[rng.integers(0, len(relu6.block_sizes), 4)]
        assert site_bytes(sizes, 6, 5, ell, "relu6") == _plain_relu6_bytes(sizes, 6, 5, ell)
    assert all_relu_count({"s": relu6}) == 2 * all_relu_count({"s": relu}) == 2 * 3 * 30
    assert all_relu_bytes({"s": relu6}) == _plain_relu6_bytes(np.ones((3, 2)), 6, 5)


def test_relu6_results_with_relu_costs_or_another_activation_are_refused():
    bad = _site("relu6")
    bad.costs = si.candidate_costs(bad.block_sizes, 6, 5)     # one DReLU per patch: wrong
    with pytest.raises(DistortionFileError, match="relu6 site"):
        check_distortion_results({"s": bad})
    model = tiny_mobilenet(0)
    sites = si.find_relu_sites(model, SHAPE)
    results = extract(model, random_images(2, 8, 0), **SMALL)
    check_against_sites(results, sites)
    converted = si.find_relu_sites(si.relu6_to_relu(copy.deepcopy(model)), SHAPE)
    with pytest.raises(DistortionFileError, match="relu6_to_relu"):
        check_against_sites(results, converted)


# ------------------------------------------------------------------ the chosen spec, run

@pytest.fixture(scope="module")
def measured():
    model = tiny_mobilenet(0)
    return model, extract(model, random_images(4, 8, 1), **SMALL)


def test_drelu_budget_counts_two_per_relu6_patch(measured):
    model, results = measured
    budget = budget_from_ratio(0.3, all_relu_count(results))
    sol = knapsack_block_spec(results, budget)
    sites = si.find_relu_sites(model, SHAPE)
    counts = si.count_drelus(sol.spec, sites)
    assert counts["total"] == sol.drelus <= budget
    assert sol.total_relus == si.total_drelus(sites) == sum(s.num_drelus for s in sites)
    program, _ = compile_model(model, (1, *SHAPE), spec=sol.spec)
    assert sum(program.drelus().values()) == sol.drelus
    assert "block_relu6" in {ly.op for ly in program.layers}


def test_byte_budget_spec_runs_with_exactly_the_knapsack_bytes(measured):
    model, results = measured
    budget = budget_from_ratio(0.35, all_relu_bytes(results))
    sol = knapsack_block_spec(results, budget, cost="bytes")
    rows = np.concatenate(list(sol.spec.values()))
    assert (rows[:, 0] == 0).any() and (rows.max(1) > 1).any()
    expected = spec_site_bytes(results, sol.spec)
    for name, r in results.items():
        assert expected[name] == (_plain_relu6_bytes(sol.spec[name], r.height, r.width)
                                  if r.activation == "relu6" else
                                  site_bytes(sol.spec[name], r.height, r.width))
    x = random_images(1, 8, 7)
    res = run_local(model, x, sol.spec, in_process=True, timeout=300)
    layers = {ly.name: ly for ly in res.program.layers}
    got = {layers[rep["name"]].attrs["site"]: rep["bytes"] for rep in res.report["layers"]
           if "site" in layers[rep["name"]].attrs}
    assert got == {n: b for n, b in expected.items() if b}
    assert sum(got.values()) == sol.bytes <= budget
    program, weights = compile_model(model, (1, *SHAPE), spec=sol.spec)
    with torch.no_grad():
        ref = si.apply_block_spec(copy.deepcopy(model), sol.spec, SHAPE).double()(x.double())
    assert bool(((res.outputs - ref).abs() <= error_bound(program, weights, x, 16) + 1e-9).all())


# ------------------------------------------------------------------ the command lines

def _write_images(folder: Path, n: int) -> None:
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_mobilenet_v2_pipeline_through_the_command_lines(tmp_path, capsys):
    import torchvision
    torch.manual_seed(3)
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10), 3).eval()
    ckpt = tmp_path / "mnv2.pth"
    torch.save(model.state_dict(), ckpt)
    _write_images(tmp_path / "imgs", 4)
    name = "mobilenet_v2,num_classes=10"
    dist, out = tmp_path / "dist", tmp_path / "spec.pickle"
    extract_cli = load_script("research/extract_block_sizes.py", "extract_relu6_cli")
    knapsack_cli = load_script("research/knapsack_patch_size_extractor.py", "knapsack_relu6_cli")
    assert extract_cli.main(["--model", name, "--checkpoint", str(ckpt), "--image-folder",
                             str(tmp_path / "imgs"), "--input-shape", "3", "32", "32",
                             "--output_path", str(dist), "--num_samples", "4",
                             "--method", "linear", "--max-rect", "2", "--max-block-size", "4",
                             "--no-progress"]) == 0, capsys.readouterr().err[-2000:]
    meta, results = load_results(dist)
    sites = si.find_relu_sites(model, (3, 32, 32))
    assert list(results) == [s.name for s in sites] and len(sites) == 35
    assert {r.activation for r in results.values()} == {"relu6"}
    assert knapsack_cli.main(["--model", name, "--channel_distortion_path", str(dist),
                              "--cost", "bytes", "--ratio", "0.4", "--block_size_spec_file_name",
                              str(out), "--no_plot"]) == 0, capsys.readouterr().err[-2000:]
    spec = si.load_spec(out)
    assert set(spec) == set(results)
    want = spec_site_bytes(results, spec)
    assert sum(want.values()) <= budget_from_ratio(0.4, all_relu_bytes(results))
    torch.manual_seed(4)
    x = torch.randn(1, 3, 32, 32)
    res = run_local(model, x, spec, in_process=True, timeout=600)
    program, weights = compile_model(model, (1, 3, 32, 32), spec=spec)
    with torch.no_grad():
        ref = si.apply_block_spec(copy.deepcopy(model), spec, (3, 32, 32))(x).double()
    err = (res.outputs - ref).abs()
    assert bool((err <= error_bound(program, weights, x, 16) + 1e-6 * (1 + ref.abs())).all())
    layers = {ly.name: ly for ly in res.program.layers}
    got = {layers[rep["name"]].attrs["site"]: rep["bytes"] for rep in res.report["layers"]
           if "site" in layers[rep["name"]].attrs}
    assert got == {n: b for n, b in want.items() if b}
