"""Block-ReLU6 layers of compiled programs: ReLU6 sites named by a spec compile to block_relu6,
run securely equal to the plaintext spec'd model within the error analysis, cost exactly the
bytes and rounds the cost model gives (and a message-count formula), calibrate both of their
comparisons, and torchvision's mobilenet_v2 keeps its ReLU6 under a spec."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import secure_inference as si
from helpers.nets import tiny_mobilenet
from helpers.reference_models import randomize_bn
from secure_inference.mpc.calibrate import calibrate, width_table
from secure_inference.mpc.compile import compile_model, error_bound, run_float
from secure_inference.mpc.costs import layer_cost, program_cost
from secure_inference.mpc.local import run_local
from secure_inference.wire_costs import mul_drelu_bytes

FRAC = 16
SHAPE = (3, 8, 8)
CHOICES = np.array([[1, 1], [2, 2], [0, 1], [3, 2], [8, 8]], dtype=np.int32)


def _mixed_spec(model: nn.Module, shape=SHAPE, seed: int = 0) -> dict:
    """Every site of the model, each channel a random choice of [1, 1], identity and patches."""
    rng = np.random.default_rng(seed)
    return {s.name: CHOICES[rng.integers(0, len(CHOICES), s.channels)]
            for s in si.find_relu_sites(model, shape)}


def _plain_layer_bytes(sizes: np.ndarray, height: int, width: int, batch: int = 1) -> int:
    """A Block-ReLU6 layer counted from its definition: two comparisons per patch, two payload
    values per non-identity pixel, one fused DReLU call."""
    patches = pixels = 0
    for h, w in sizes.tolist():
        if h == 0 or w == 0:
            continue
        patches += -(-height // min(h, height)) * -(-width // min(w, width))
        pixels += height * width
    return mul_drelu_bytes(2 * batch * patches, 2 * batch * pixels)


def _spec_model(model, spec, shape=SHAPE):
    return si.apply_block_spec(copy.deepcopy(model), spec, shape).eval()


# ------------------------------------------------------------------ compiling

def test_relu6_sites_compile_to_block_relu6_clamp_or_nothing():
    model = tiny_mobilenet(0)
    sites = si.find_relu_sites(model, SHAPE)
    a, b, c = sites[0], sites[1], sites[2]
    spec = {a.name: CHOICES[np.arange(a.channels) % 5],
            b.name: np.ones((b.channels, 2), np.int32),        # ReLU6 kept: the clamp layer
            c.name: np.zeros((c.channels, 2), np.int32)}       # identity: no layer
    program, _ = compile_model(model, (1, *SHAPE), spec=spec)
    ops = {layer.attrs.get("site"): layer.op for layer in program.layers if "site" in layer.attrs}
    assert ops[a.name] == "block_relu6" and ops[b.name] == "clamp" and c.name not in ops
    assert ops[sites[-1].name] == "relu"                       # the head's ReLU site
    layer = next(ly for ly in program.layers if ly.op == "block_relu6")
    np.testing.assert_array_equal(layer.attrs["block_sizes"], spec[a.name])
    # a model that already carries the Block-ReLU6 compiles to the same program
    applied, _ = compile_model(_spec_model(model, spec), (1, *SHAPE))
    assert applied.fingerprint() == program.fingerprint()
    plain, _ = compile_model(model, (1, *SHAPE))
    assert [ly.op for ly in plain.layers].count("clamp") == 5
    assert program.drelus()[layer.name] == 2 * int(si.block_costs(spec[a.name], a.height,
                                                                  a.width).sum())


def test_the_fingerprint_covers_the_block_relu6_spec():
    model = tiny_mobilenet(0)
    site = si.find_relu_sites(model, SHAPE)[1]
    rows = np.tile([[2, 2]], (site.channels, 1)).astype(np.int32)
    one, _ = compile_model(model, (1, *SHAPE), spec={site.name: rows})
    other = rows.copy()
    other[3] = [4, 4]
    two, _ = compile_model(model, (1, *SHAPE), spec={site.name: other})
    assert one.fingerprint() != two.fingerprint()
    p1, p2 = one.fingerprint_parts(), two.fingerprint_parts()
    assert [k for k in p1 if p1[k] != p2[k]] == ["block spec"]
    relu = si.relu6_to_relu(copy.deepcopy(model))
    as_relu, _ = compile_model(relu, (1, *SHAPE), spec={site.name: rows})
    assert {ly.op for ly in as_relu.layers} >= {"block_relu"}
    assert as_relu.fingerprint_parts()["architecture"] != p1["architecture"]


def test_run_float_equals_the_spec_model():
    model = tiny_mobilenet(1)
    spec = _mixed_spec(model, seed=1)
    program, weights = compile_model(model, (1, *SHAPE), spec=spec)
    assert "block_relu6" in {ly.op for ly in program.layers}
    x = torch.randn(3, *SHAPE, dtype=torch.float64) * 2
    with torch.no_grad():
        ref = _spec_model(model, spec).double()(x)
    torch.testing.assert_close(run_float(program, weights, x), ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ the secure run

def test_secure_run_matches_the_plaintext_with_exact_bytes_and_rounds():
    model = tiny_mobilenet(0)
    spec = _mixed_spec(model, seed=2)
    torch.manual_seed(3)
    x = torch.randn(2, *SHAPE)
    res = run_local(model, x, spec, in_process=True, batch_size=2, timeout=300)
    program, weights = compile_model(model, (2, *SHAPE), spec=spec)
    with torch.no_grad():
        ref = _spec_model(model, spec).double()(x.double())
    err = (res.outputs - ref).abs()
    assert bool((err <= error_bound(program, weights, x, FRAC) + 1e-9).all()), float(err.max())
    assert float(err.max()) > 0
    layers = {ly.name: ly for ly in res.program.layers}
    sites = {s.name: s for s in si.find_relu_sites(model, SHAPE)}
    seen = 0
    for rep in res.report["layers"]:
        layer = layers[rep["name"]]
        assert (rep["bytes"], rep["rounds"]) == layer_cost(res.program, layer, batch=2)
        if layer.op == "block_relu6":
            site = sites[layer.attrs["site"]]
            assert rep["bytes"] == _plain_layer_bytes(spec[site.name], site.height, site.width,
                                                      batch=2)
            assert rep["rounds"] == 3
            assert rep["drelus"] == 2 * 2 * int(si.block_costs(spec[site.name], site.height,
                                                               site.width).sum())
            seen += 1
    assert seen == 5
    cost = program_cost(res.program, batch=2)
    assert res.report["online"]["bytes"] == cost["online_bytes"]
    assert res.report["online"]["rounds"] == cost["online_rounds"]
    assert res.report["online"]["drelus"] == cost["drelus"] == si.count_drelus(
        spec, list(sites.values()))["total"] * 2


def test_ambiguous_block_relu6_decisions_near_six_are_flipped_by_the_bound():
    """A patch whose mean sits next to 6 is an ambiguous decision: the bound adds the effect of
    the other choice (every pixel 6 instead of its own value), and flipping it changes the
    output."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU6(), nn.Flatten()).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    spec = {"1": np.array([[2, 2]], np.int32)}
    program, weights = compile_model(model, (1, 1, 2, 4), spec=spec)
    x = torch.tensor([[[[6.0, 6.0, 1.0, 2.0], [9.0, 3.0, 5.0, 4.0]]]], dtype=torch.float64)
    x[0, 0, 0, 0] += 1e-7        # left patch mean 6 + 2.5e-8: set to 6, but only just
    from secure_inference.mpc.compile import error_std
    _, ambiguous = error_std(program, weights, x, FRAC)
    name = next(ly.name for ly in program.layers if ly.op == "block_relu6")
    assert ambiguous == [(name, 0, 0, 0, 0)]
    flipped = run_float(program, weights, x, flips=ambiguous)
    base = run_float(program, weights, x)
    assert base[0, :2].tolist() == [6.0, 6.0] and flipped[0, 0] == x[0, 0, 0, 0]
    bound = error_bound(program, weights, x, FRAC)
    assert float(bound[0, 4]) >= 3.0 - 1e-6      # the 9 of that patch: 6 or 9


# ------------------------------------------------------------------ calibration

def test_calibration_records_both_comparisons_and_prices_their_width():
    model = tiny_mobilenet(2)
    site = si.find_relu_sites(model, SHAPE)[0]
    spec = {site.name: np.tile([[2, 2]], (site.channels, 1)).astype(np.int32)}
    torch.manual_seed(4)
    images = torch.randn(6, *SHAPE)
    cal = calibrate(model, images, spec)
    # the plaintext patch sums at the site, from the model itself
    pre = {}

    def record(module, args):
        pre["x"] = args[0].detach().double().clone()
    net = _spec_model(model, spec)
    hook = net.get_submodule(site.module_path).register_forward_pre_hook(record)
    with torch.no_grad():
        net(images)
    hook.remove()
    sums = torch.nn.functional.avg_pool2d(pre["x"], 2, 2, divisor_override=1)
    want = max(float(sums.abs().max()), float((sums - 6 * 4).abs().max()))
    name = next(ly.name for ly in compile_model(model, (1, *SHAPE), spec=spec)[0].layers
                if ly.op == "block_relu6")
    assert cal.calibration.ranges[name] == pytest.approx(want, rel=1e-6)
    assert float((sums - 24).abs().max()) > float(sums.abs().max())   # the 6-comparison wider
    res = run_local(model, images[:2], cal, in_process=True, batch_size=2, timeout=300)
    rows = {r["layer"]: r for r in width_table(res.program, frac_bits=FRAC, batch=2)}
    measured = {ly["name"]: ly["bytes"] for ly in res.report["layers"]}
    assert rows[name]["width"] < 64 and rows[name]["op"] == "block_relu6"
    assert measured[name] == rows[name]["bytes"] == mul_drelu_bytes(
        rows[name]["drelus"], rows[name]["payload"], rows[name]["width"])
    assert rows[name]["payload"] == 2 * 2 * site.num_relus
    with torch.no_grad():
        ref = net.double()(images[:2].double())
    assert float((res.outputs - ref).abs().max()) < 1e-2


# ------------------------------------------------------------------ torchvision's MobileNetV2

def test_mobilenet_v2_keeps_relu6_under_a_block_spec_and_runs_securely():
    import torchvision
    torch.manual_seed(1)
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10), 1).eval()
    shape = (3, 32, 32)
    sites = si.find_relu_sites(model, shape)
    assert {s.activation for s in sites} == {"relu6"}
    rng = np.random.default_rng(5)
    patches = np.array([[1, 1], [2, 2], [4, 4], [0, 1], [2, 3]], dtype=np.int32)
    spec = {s.name: patches[rng.integers(0, len(patches), s.channels)] for s in sites[::3]}
    torch.manual_seed(2)
    x = torch.randn(1, *shape)
    res = run_local(model, x, spec, in_process=True, timeout=600)
    program, weights = compile_model(model, (1, *shape), spec=spec)
    assert [ly.op for ly in program.layers].count("block_relu6") == len(spec)
    assert [ly.op for ly in program.layers].count("clamp") == len(sites) - len(spec)
    with torch.no_grad():
        ref = _spec_model(model, spec, shape)(x).double()
    err = (res.outputs - ref).abs()
    bound = error_bound(program, weights, x, FRAC) + 1e-6 * (1 + ref.abs())
    assert bool((err <= bound).all()), (float(err.max()), float(bound.max()))
    assert float(err.max()) > 0
    cost = program_cost(res.program)
    assert res.report["online"]["bytes"] == cost["online_bytes"]
    assert res.report["online"]["rounds"] == cost["online_rounds"]
    unspecd = program_cost(compile_model(model, (1, *shape))[0])
    assert cost["online_bytes"] < unspecd["online_bytes"]
    assert cost["online_rounds"] == unspecd["online_rounds"]   # Block-ReLU6: a ReLU6's rounds
