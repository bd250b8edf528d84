"""Dropped low bits per ReLU layer (opt-in calibration --drop-budget): the expected-error rule
against a plain per-value reference, the choice under a budget, the spec file, the program and
its fingerprint, and a secure run within the error analysis with the bytes of its widths."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import secure_inference as si
from secure_inference.mpc.analysis import error_bound
from secure_inference.mpc.calibrate import calibrate, width_table
from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.costs import layer_cost
from secure_inference.mpc.dropped_bits import DropErrorAccumulator, choose_drop
from secure_inference.mpc.local import run_local
from secure_inference.mpc.ops import DROP_ATTR, WIDTH_ATTR, layer_drelu_config
from secure_inference.mpc.settings import DReLUConfig
from secure_inference.spec import BlockSpec
from secure_inference.widths import Calibration
from secure_inference.wire_costs import mul_drelu_bytes

from tests.helpers.nets import tiny_resnet


def _reference_error(x: torch.Tensor, frac_bits: int, drop: int) -> float:
    """Independent reference: per value, the DReLU's own probability of a wrong bit
    (DReLUConfig.error_probability, for the ring integer u the value encodes to) times the
    error a wrong bit makes (the ReLU outputs 0 instead of the encoded u / 2^f)."""
    cfg = DReLUConfig(ring_bits=64 - drop, drop_bits=drop)
    total = 0.0
    for v in x.double().reshape(-1).tolist():
        u = int(round(v * 2 ** frac_bits))
        p = float(cfg.error_probability(torch.tensor([u]))[0]) if drop else 0.0
        total += p * max(u, 0) / 2 ** frac_bits
    return total


def _edge_values(frac_bits: int) -> torch.Tensor:
    """Values around every power-of-two boundary a drop can have, negatives and zero."""
    units = [0, 1, 2, 3, -1, -2, -5]
    for d in range(1, 12):
        units += [2 ** d - 2, 2 ** d - 1, 2 ** d, 2 ** d + 1]
    return torch.tensor(units, dtype=torch.float64) / 2 ** frac_bits


@pytest.mark.parametrize("frac_bits", [8, 16])
def test_expected_error_equals_the_per_value_reference(frac_bits):
    torch.manual_seed(0)
    x = torch.cat([_edge_values(frac_bits), torch.randn(300) * 2 ** (6 - frac_bits),
                   torch.randn(50)])
    acc = DropErrorAccumulator(frac_bits, max_drop=12)
    acc.add(x[:100])                        # two batches add up
    acc.add(x[100:])
    assert acc.l1 == pytest.approx(float(torch.relu(x).sum()))
    assert acc.errors[0] == 0.0
    for d in range(1, 13):
        ref = _reference_error(x, frac_bits, d)
        assert acc.errors[d] == pytest.approx(ref, rel=1e-9, abs=1e-15), d
    assert all(a <= b for a, b in zip(acc.errors, acc.errors[1:]))   # non-decreasing in d


def _accumulated(x: torch.Tensor, frac_bits: int, drop: int) -> float:
    acc = DropErrorAccumulator(frac_bits, max_drop=drop)
    acc.add(x)
    return acc.errors[drop]


def test_the_boundary_value_is_never_wrong():
    # u = 2^d − 1 is decided correctly (probability 0), u = 2^d − 2 with probability 1/2^d
    d, f = 5, 10
    assert _accumulated(torch.tensor([31.0 / 2 ** f]), f, d) == 0.0
    assert _accumulated(torch.tensor([30.0 / 2 ** f]), f, d) == pytest.approx(
        30.0 / 2 ** f / 32)
    assert _accumulated(torch.tensor([-3.0 / 2 ** f, 0.0]), f, d) == 0.0


def test_choose_drop_takes_the_most_bits_within_the_budget():
    errors = [0.0, 0.1, 0.4, 0.9, 2.0]
    assert choose_drop(errors, 100.0, 0.004) == 2       # 0.4 ≤ 0.4 < 0.9
    assert choose_drop(errors, 100.0, 0.0009) == 0
    assert choose_drop(errors, 100.0, 1.0) == 4
    assert choose_drop(errors, 100.0, 0.0) == 0         # no budget: exact
    assert choose_drop(errors, 0.0, 0.5) == 0           # a layer with no output
    with pytest.raises(ValueError, match="drop budget"):
        choose_drop(errors, 1.0, float("nan"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4)).eval()


def test_calibration_chooses_drops_that_meet_the_budget_on_its_images():
    model = _net()
    images = torch.randn(8, 3, 9, 9)
    budget = 0.01
    spec = calibrate(model, images, drop_budget=budget)
    cal = spec.calibration
    assert cal.drop_budget == budget and set(cal.drops) == {"1", "4"}   # ReLU layers only
    program, weights = compile_model(model, (1, 3, 9, 9), drelu_width=64)
    ins = {}

    def hook(layer, xs, y):
        if layer.name in cal.drops:
            ins[layer.name] = xs[0]
    from secure_inference.mpc.analysis import run_float
    run_float(program, weights, images.double(), hook=hook)
    for name, d in cal.drops.items():
        l1 = float(torch.relu(ins[name]).sum())
        assert _reference_error(ins[name], 16, d) <= budget * l1           # within budget
        assert _reference_error(ins[name], 16, d + 1) > budget * l1        # the most bits
    assert calibrate(model, images).calibration.drops == {}               # default: exact


def test_drops_travel_with_the_spec_and_old_files_load(tmp_path):
    cal = Calibration(ranges={"1": 2.0, "4": 1.0}, images=3, headroom=1e9, drops={"1": 7},
                      drop_budget=0.02)
    for name in ("s.pickle", "s.json"):
        si.save_spec(BlockSpec({}, cal), tmp_path / name)
        assert si.load_spec(tmp_path / name).calibration == cal
    plain = Calibration(ranges={"1": 2.0})
    assert "drops" not in plain.to_plain()        # files without drops are as before
    assert Calibration.from_plain(plain.to_plain()).drops == {}


@pytest.mark.parametrize("drops", [{"1": -1}, {"1": 62}, {"1": 2.5}, {"1": True},
                                   {"nope": 3}, [3]])
def test_malformed_drops_are_refused(tmp_path, drops):
    plain = Calibration(ranges={"1": 2.0}).to_plain()
    plain["drops"] = drops
    path = tmp_path / "bad.pickle"
    path.write_bytes(pickle.dumps({"__calibration__": plain}))
    with pytest.raises(si.SpecError, match="drops|dropped"):
        si.load_spec(path)


def test_drops_in_the_program_its_fingerprint_and_the_fixed_point():
    model = _net()
    cal = Calibration(ranges={"1": 2.0, "4": 1.0, "2.max_pool": 1.0}, frac_bits=16,
                      drops={"1": 6, "2.max_pool": 5, "4": 40})
    program, _ = compile_model(model, (1, 3, 9, 9), calibration=cal)
    layers = {ly.name: ly for ly in program.layers}
    assert layers["1"].attrs[DROP_ATTR] == 6
    assert DROP_ATTR not in layers["2.max_pool"].attrs      # only ReLU layers drop bits
    width4 = layers["4"].attrs[WIDTH_ATTR]
    assert layers["4"].attrs[DROP_ATTR] == width4 - 3        # at least 3 bits compared
    assert layer_drelu_config(layers["1"]) == DReLUConfig(
        ring_bits=layers["1"].attrs[WIDTH_ATTR] - 6, drop_bits=6)
    exact, _ = compile_model(model, (1, 3, 9, 9), calibration=Calibration(
        ranges=cal.ranges, frac_bits=16))
    assert exact.widths() == program.widths()
    parts, dparts = exact.fingerprint_parts(), program.fingerprint_parts()
    assert exact.fingerprint() != program.fingerprint()
    assert [k for k in parts if parts[k] != dparts[k]] == ["comparison widths"]
    forced, _ = compile_model(model, (1, 3, 9, 9), calibration=cal, drelu_width=64)
    assert not any(DROP_ATTR in ly.attrs for ly in forced.layers)   # 64: today's exact DReLU
    # the drop keeps its real-unit threshold 2^(d − f) at another fixed point
    at12, _ = compile_model(model, (1, 3, 9, 9), calibration=cal, frac_bits=12)
    assert {ly.name: ly.attrs.get(DROP_ATTR) for ly in at12.layers}["1"] == 2
    assert cal.drop("1", 9) == 0 and cal.drop("1", 20) == 10 and cal.drop("x", 16) == 0


def test_secure_run_with_drops_is_within_the_error_analysis_with_the_bytes_of_its_widths():
    model = tiny_resnet(seed=3, width=4).eval()
    torch.manual_seed(1)
    train, test = torch.randn(16, 3, 16, 16), torch.randn(3, 3, 16, 16)
    exact = calibrate(model, train)
    spec = calibrate(model, train, drop_budget=0.05)
    assert spec.calibration.drops and spec.calibration.ranges == exact.calibration.ranges
    result = run_local(model, test, spec, in_process=True)
    base = run_local(model, test, exact, in_process=True)
    program = result.program
    weights = compile_model(model, (3, 3, 16, 16), spec=spec)[1]
    with torch.no_grad():
        ref = model(test).double()
    bound = error_bound(program, weights, test, 16)
    assert ((result.outputs - ref).abs() <= bound).all()
    dropped = [ly for ly in program.layers if ly.attrs.get(DROP_ATTR)]
    assert dropped and all(ly.op == "relu" for ly in dropped)
    measured = {ly["name"]: ly for ly in result.report["layers"]}
    rows = {r["layer"]: r for r in width_table(program, frac_bits=16, batch=3)}
    for ly in dropped:
        d, width = ly.attrs[DROP_ATTR], ly.attrs[WIDTH_ATTR]
        n = int(np.prod(ly.shape[1:])) * 3
        assert measured[ly.name]["bytes"] == layer_cost(program, ly, 3)[0] == \
            mul_drelu_bytes(n, n, width - d) == rows[ly.name]["bytes"]
        assert measured[ly.name]["drelu_dropped_bits"] == rows[ly.name]["dropped_bits"] == d
        assert rows[ly.name]["bytes_64"] == mul_drelu_bytes(n, n, 64)
    assert result.report["online"]["bytes"] < base.report["online"]["bytes"]
    assert result.report["online"]["rounds"] == base.report["online"]["rounds"]
