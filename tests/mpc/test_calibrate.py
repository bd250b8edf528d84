"""Calibrated comparison widths: the width rule against a brute-force reference, the DReLU at the
edges of its range, calibration against plain references, the headroom refusal, spec files with
ranges, widths in the program and its header, and the bytes of a calibrated secure run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import secure_inference as si
from secure_inference.mpc.calibrate import (HeadroomError, bytes_saved_by_widths, calibrate,
                                            calibrate_program, width_table)
from secure_inference.mpc.compile import compile_model, truncation_failures
from secure_inference.mpc.harness import run_in_process
from secure_inference.mpc.local import run_local
from secure_inference.mpc.party import run_party
from secure_inference.mpc.protocols import drelu as D
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.trace import assign_widths
from secure_inference.spec import BlockSpec
from secure_inference.widths import (RANGE_SLACK_UNITS, Calibration, CalibrationError,
                                     comparison_width)
from secure_inference.wire_costs import mul_drelu_bytes

from tests.helpers.nets import tiny_resnet

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def _width_reference(max_abs: float, frac_bits: int, margin: float) -> int:
    """Smallest ℓ in [3, 64] whose signed range [−2^(ℓ−1), 2^(ℓ−1)) holds the bound."""
    bound = math.ceil(max_abs * margin * 2 ** frac_bits) + RANGE_SLACK_UNITS
    for ell in range(3, 65):
        if bound < 2 ** (ell - 1):
            return ell
    return 64


@pytest.mark.parametrize("max_abs", [0.0, 1e-9, 0.5, 1.0, 3.999, 4.0, 1000.0, 2.0 ** 40, 1e30])
@pytest.mark.parametrize("frac_bits,margin", [(16, 8.0), (12, 1.0), (20, 3.5)])
def test_comparison_width_is_the_smallest_that_holds_the_range(max_abs, frac_bits, margin):
    assert comparison_width(max_abs, frac_bits, margin) == _width_reference(max_abs, frac_bits,
                                                                            margin)


def test_comparison_width_at_a_power_of_two_boundary():
    # bound = 2^20 − 1 needs 21 bits, 2^20 needs 22
    unit = 2.0 ** -16
    assert comparison_width((2 ** 20 - 1 - RANGE_SLACK_UNITS) * unit, 16, 1.0) == 21
    assert comparison_width((2 ** 20 - RANGE_SLACK_UNITS) * unit, 16, 1.0) == 22


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_comparison_width_refuses_bad_ranges(bad):
    with pytest.raises(CalibrationError):
        comparison_width(bad, 16, 8.0)
    with pytest.raises(CalibrationError):
        comparison_width(1.0, 16, 0.5)


def _drelu_values(ell: int, x: torch.Tensor) -> torch.Tensor:
    x0 = torch.randint(I64_MIN, I64_MAX, x.shape, dtype=torch.int64)
    x1 = x - x0
    cfg = D.DReLUConfig(ring_bits=ell)

    def fn(party):
        inp = [x0, x1, party.placeholder(tuple(x.shape))][party.role]
        return D.drelu(party, inp, cfg)

    res = run_in_process(fn, timeout=60)
    return res[0] + res[1]


@pytest.mark.parametrize("ell", [3, 8, 27, 40, 63])
def test_drelu_at_a_width_is_exact_to_the_edges_of_its_range_and_wrong_just_beyond(ell):
    half = 1 << (ell - 1)
    inside = torch.tensor([half - 1, -half, 0, -1, 1, half // 2, -(half // 2)] * 8)
    got = _drelu_values(ell, inside)
    assert torch.equal(got, (inside >= 0).long())
    # one beyond each end wraps in the ℓ-bit ring: the sign is then wrong (an answer, no leak)
    beyond = torch.tensor([half, -half - 1] * 8)
    assert torch.equal(_drelu_values(ell, beyond), (beyond < 0).long())


def test_drelu_at_64_bits_covers_the_whole_ring():
    x = torch.tensor([I64_MAX, I64_MIN, 0, -1, 1] * 4)
    assert torch.equal(_drelu_values(64, x), (x >= 0).long())


# ------------------------------------------------------------------ calibration

def _net(seed: int = 0, maxpool: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()]
    if maxpool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    layers += [nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(6, 4)]
    return nn.Sequential(*layers).eval()


SPEC_2X2 = {"4": np.array([[2, 2], [1, 1], [3, 2], [0, 1], [5, 5], [2, 2]], dtype=np.int32)}


def _plain_ranges(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Independent reference: the largest |ReLU input|, |Block-ReLU patch sum| (a loop over
    patches) and max-pool spread (max − min of each window, a loop over windows)."""
    x = x.double()
    model = model.double()
    torch.set_grad_enabled(False)
    a = model[0](x)
    out = {"1": float(a.abs().max())}
    r = torch.relu(a)
    pooled = model[2](r)
    spread = 0.0
    n, c, h, w = r.shape
    for oy in range(pooled.shape[2]):
        for ox in range(pooled.shape[3]):
            ys = slice(max(0, 2 * oy - 1), min(h, 2 * oy + 2))
            xs = slice(max(0, 2 * ox - 1), min(w, 2 * ox + 2))
            win = r[:, :, ys, xs].reshape(n, c, -1)
            spread = max(spread, float((win.max(-1).values - win.min(-1).values).max()))
    out["2.max_pool"] = spread
    b = model[3](pooled)
    best = 0.0
    for ch, (bh, bw) in enumerate(SPEC_2X2["4"]):
        if bh == 0:
            continue
        for i in range(0, b.shape[2], bh):
            for j in range(0, b.shape[3], bw):
                best = max(best, float(b[:, ch, i:i + bh, j:j + bw].sum((-1, -2)).abs().max()))
    out["4"] = best
    model.float()
    torch.set_grad_enabled(True)
    return out


def test_calibration_records_the_plain_ranges():
    model = _net()
    x = torch.randn(5, 3, 9, 9)
    cal = calibrate(model, x, SPEC_2X2, margin=4.0, batch_size=2)
    assert isinstance(cal, BlockSpec) and list(cal) == ["4"]
    np.testing.assert_array_equal(cal["4"], SPEC_2X2["4"])
    ref = _plain_ranges(model, x)
    assert set(cal.calibration.ranges) == set(ref)
    for name, value in ref.items():
        assert cal.calibration.ranges[name] == pytest.approx(value, rel=1e-9), name
    assert cal.calibration.images == 5 and cal.calibration.margin == 4.0


def test_headroom_refused_with_the_fix():
    model = _net(maxpool=False)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        model[0].weight.mul_(3e14)
    with pytest.raises(HeadroomError, match="rescale the inputs"):   # hopeless at any f >= 8
        calibrate(model, x)
    with torch.no_grad():
        model[0].weight.div_(1e6)   # activations ~7e8: fit at a lower frac_bits
    program, weights = compile_model(model, (1, 3, 9, 9))
    room = calibrate_program(program, weights, x, check=False).headroom
    assert 8 / 4 ** 8 < room < 8     # refused at 16, not hopeless
    lower = 16 - math.ceil(math.log(8 / room, 4))   # each bit less: 4x the room
    with pytest.raises(HeadroomError, match=f"--frac-bits {lower} "):
        calibrate(model, x)
    with pytest.raises(HeadroomError, match="headroom too small"):
        calibrate(model, x, frac_bits=lower + 1, max_failures=math.inf)
    # (values this large also expect many truncation failures: that check is not tested here)
    assert calibrate(model, x, frac_bits=lower,
                     max_failures=math.inf).calibration.headroom >= 8


def test_too_many_expected_truncation_failures_refused_with_the_fix():
    """Ample headroom (the largest value far below 2^63) but many large values: their summed
    failure probability is refused, with the fractional bits that fit; a higher limit or
    fewer fractional bits pass, and the rate scales by 4 per bit."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 16 * 16, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(300.0)
    x = torch.randn(2, 3, 16, 16)
    program, weights = compile_model(model, (1, 3, 16, 16))
    cal = calibrate_program(program, weights, x, frac_bits=20, check=False)
    assert cal.headroom > 1e3 and cal.truncation_failures > 1e-2
    need = math.ceil(math.log(cal.truncation_failures / 1e-3, 4))
    with pytest.raises(HeadroomError, match=f"--frac-bits {20 - need} .*--max-failures"):
        calibrate(model, x, frac_bits=20)
    ok = calibrate(model, x, frac_bits=20 - need).calibration
    assert ok.truncation_failures <= 1e-3
    assert ok.truncation_failures == pytest.approx(cal.truncation_failures / 4 ** need,
                                                   rel=1e-6)
    for limit in (cal.truncation_failures * 1.01, math.inf):
        got = calibrate(model, x, frac_bits=20, max_failures=limit).calibration
        assert got.truncation_failures == pytest.approx(cal.truncation_failures, rel=1e-9)
    with pytest.raises(ValueError, match="max_failures"):
        calibrate(model, x, max_failures=float("nan"))


def test_calibration_refuses_nan_and_integer_images():
    model = _net()
    x = torch.randn(2, 3, 9, 9)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        calibrate(model, x)
    with pytest.raises(TypeError, match="uint8"):
        calibrate(model, torch.zeros(2, 3, 9, 9, dtype=torch.uint8))


# ------------------------------------------------------------------ files

def test_spec_with_ranges_round_trips_and_old_specs_load(tmp_path):
    cal = Calibration(ranges={"4": 3.25, "2.max_pool": 1.5e-3}, margin=6.0, images=7,
                      frac_bits=14, max_activation=9.5, headroom=1e9)
    spec = BlockSpec(SPEC_2X2, cal)
    for name in ("s.pickle", "s.json"):
        si.save_spec(spec, tmp_path / name)
        back = si.load_spec(tmp_path / name)
        assert list(back) == ["4"] and back.calibration == cal
        np.testing.assert_array_equal(back["4"], SPEC_2X2["4"])
    si.save_spec(SPEC_2X2, tmp_path / "old.pickle")   # a plain dict: the format as before
    old = si.load_spec(tmp_path / "old.pickle")
    assert old.calibration is None and list(old) == ["4"]


@pytest.mark.parametrize("broken", [
    {"version": 2, "ranges": {}, "margin": 8.0, "images": 1, "frac_bits": 16},
    {"version": 1, "ranges": {"a": -1.0}, "margin": 8.0, "images": 1, "frac_bits": 16},
    {"version": 1, "ranges": {"a": float("nan")}, "margin": 8.0, "images": 1, "frac_bits": 16},
    {"version": 1, "ranges": {"a": "1"}, "margin": 8.0, "images": 1, "frac_bits": 16},
    {"version": 1, "ranges": {"a": 1.0}, "margin": 0.5, "images": 1, "frac_bits": 16},
    {"version": 1, "ranges": {"a": 1.0}, "margin": 8.0, "images": 1, "frac_bits": 99},
    {"version": 1, "ranges": {"": 1.0}, "margin": 8.0, "images": 1, "frac_bits": 16},
    {"version": 1, "ranges": [1.0], "margin": 8.0, "images": 1, "frac_bits": 16},
])
def test_malformed_calibration_in_a_spec_file_is_refused(tmp_path, broken):
    import pickle
    path = tmp_path / "bad.pickle"
    path.write_bytes(pickle.dumps({"4": SPEC_2X2["4"], "__calibration__": broken}))
    with pytest.raises(si.SpecError, match="__calibration__"):
        si.load_spec(path)


# ------------------------------------------------------------------ the compiled program

def test_widths_in_the_program_and_its_fingerprint():
    model = _net()
    cal = calibrate(model, torch.randn(3, 3, 9, 9), SPEC_2X2)
    plain, _ = compile_model(model, (1, 3, 9, 9), spec=SPEC_2X2)
    calibrated, _ = compile_model(model, (1, 3, 9, 9), spec=cal)
    forced, _ = compile_model(model, (1, 3, 9, 9), spec=cal, drelu_width=64)
    widths = calibrated.widths()
    assert set(widths) == {"1", "2.max_pool", "4"}
    for name, width in widths.items():
        assert width == comparison_width(cal.calibration.ranges[name], 16, 8.0) < 64
    assert plain.widths() == forced.widths() == dict.fromkeys(widths, 64)
    assert plain.fingerprint() == forced.fingerprint() != calibrated.fingerprint()
    other_f, _ = compile_model(model, (1, 3, 9, 9), spec=cal, frac_bits=12)
    assert other_f.fingerprint() != calibrated.fingerprint()
    parts, cparts = plain.fingerprint_parts(), calibrated.fingerprint_parts()
    assert [k for k in parts if parts[k] != cparts[k]] == ["comparison widths"]


def test_a_calibration_of_another_program_is_refused():
    model = _net()
    cal = Calibration(ranges={"1": 1.0, "no.such.layer": 2.0})
    with pytest.raises(CalibrationError, match="another model"):
        compile_model(model, (1, 3, 9, 9), calibration=cal)


def _mismatch_error(program_of_role) -> str:
    def fn(party):
        program, weights = program_of_role(party.role)
        images = [torch.randn(1, 3, 9, 9)] if party.role == 0 else None
        run_party(party, program, images=images, weights=weights if party.role == 1 else None)

    with pytest.raises(ProtocolError) as info:
        run_in_process(fn, timeout=60)
    return str(info.value)


def test_a_width_mismatch_between_parties_is_refused_and_named():
    model = _net()
    cal = calibrate(model, torch.randn(3, 3, 9, 9), SPEC_2X2)
    calibrated = compile_model(model, (1, 3, 9, 9), spec=cal)
    plain = compile_model(model, (1, 3, 9, 9), spec=SPEC_2X2)
    msg = _mismatch_error(lambda role: plain if role == 2 else calibrated)
    assert "comparison widths differ" in msg and "block spec" not in msg
    other_spec = compile_model(model, (1, 3, 9, 9), spec={"4": np.ones((6, 2), np.int32)})
    msg = _mismatch_error(lambda role: other_spec if role == 1 else plain)
    assert "block spec differ" in msg and "widths" not in msg


def test_a_program_for_another_fixed_point_is_refused():
    model = _net()
    cal = calibrate(model, torch.randn(3, 3, 9, 9), SPEC_2X2)
    program, weights = compile_model(model, (1, 3, 9, 9), spec=cal, frac_bits=12)
    def fn(party):   # the parties run the default frac_bits = 16
        run_party(party, program, images=[torch.randn(1, 3, 9, 9)] if party.role == 0 else None,
                  weights=weights if party.role == 1 else None)

    with pytest.raises(ValueError, match="frac_bits=12"):
        run_in_process(fn, timeout=60)


# ------------------------------------------------------------------ a calibrated secure run

def test_calibrated_run_matches_plaintext_with_the_bytes_of_its_widths():
    model = tiny_resnet(seed=3, width=4).eval()
    torch.manual_seed(1)
    train, test = torch.randn(16, 3, 16, 16), torch.randn(3, 3, 16, 16)
    sites = si.find_relu_sites(model, (3, 16, 16))
    spec = {sites[2].name: np.tile(np.array([[2, 2], [3, 3], [1, 1], [0, 1]], np.int32),
                                   (sites[2].channels // 4 + 1, 1))[:sites[2].channels]}
    cal = calibrate(model, train, spec)
    result = run_local(model, test, cal, in_process=True)
    plain = run_local(model, test, spec, in_process=True)
    with torch.no_grad():
        ref = si.apply_block_spec(model, spec, (3, 16, 16))(test).double()
    assert (result.outputs - ref).abs().max() < 1e-2
    assert (plain.outputs - ref).abs().max() < 1e-2
    program = result.program
    rows = {r["layer"]: r for r in width_table(program, frac_bits=16, batch=3)}
    assert rows and all(r["width"] < 64 for r in rows.values())
    measured = {l["name"]: l for l in result.report["layers"]}
    for name, row in rows.items():   # exact bytes per layer at the layer's width
        assert measured[name]["bytes"] == row["bytes"], name
        assert measured[name]["drelu_width"] == row["width"]
        # the range the width decides exactly: 2^(ℓ−1−f), and it holds the calibrated range
        assert measured[name]["drelu_range"] == 2.0 ** (row["width"] - 1 - 16)
        assert measured[name]["drelu_range"] >= cal.calibration.ranges[name]
    assert all(l["drelu_range"] is None for l in plain.report["layers"])
    base = {l["name"]: l["bytes"] for l in plain.report["layers"]}
    for name, row in rows.items():
        assert base[name] == row["bytes_64"]
        if program.layers[[l.name for l in program.layers].index(name)].op == "relu":
            assert row["bytes"] == mul_drelu_bytes(row["drelus"], row["drelus"], row["width"])
    assert result.report["online"]["rounds"] == plain.report["online"]["rounds"]
    assert (plain.report["online"]["bytes"] - result.report["online"]["bytes"]
            == bytes_saved_by_widths(program, [3]) > 0)
    assert result.report["online"]["bytes"] < plain.report["online"]["bytes"]


def test_assign_widths_uniform_and_reset():
    model = _net()
    program, _ = compile_model(model, (1, 3, 9, 9), spec=SPEC_2X2, drelu_width=30)
    assert set(program.widths().values()) == {30}
    assign_widths(program, None, frac_bits=16)
    assert set(program.widths().values()) == {64} and program.frac_bits is None
    with pytest.raises(ValueError, match="drelu_width"):
        assign_widths(program, None, frac_bits=16, drelu_width=2)


def test_calibrate_program_reports_progress_and_the_largest_activation():
    model = _net()
    program, weights = compile_model(model, (1, 3, 9, 9), drelu_width=64)
    x = torch.randn(7, 3, 9, 9)
    seen = []
    cal = calibrate_program(program, weights, x, batch_size=3, progress=seen.append)
    assert seen == [3, 3, 1]
    with torch.no_grad():
        acts = [x.double()]
        h = x.double()
        for m in model.double():
            h = m(h)
            acts.append(h)
        model.float()
    assert cal.max_activation == pytest.approx(max(float(a.abs().max()) for a in acts), rel=1e-9)
    expected = truncation_failures(program, weights, x, 16)["per_image"]
    assert cal.truncation_failures == pytest.approx(expected, rel=1e-9) and expected > 0


def test_width_table_bytes_equal_the_run_for_the_newer_comparison_layers():
    """The per-layer bytes of width_table (at the calibrated widths and at 64 bits) equal a
    run's measured bytes also for adaptive max pooling, ceil-mode max pooling, ReLU6 and
    hardswish (each priced by the program's cost model)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(),
                          nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Hardswish(), nn.AdaptiveMaxPool2d((3, 2)), nn.Flatten(),
                          nn.Linear(24, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    cal = calibrate(model, torch.randn(8, 3, 10, 10), None)
    result = run_local(model, x, cal, in_process=True, batch_size=2)
    plain = run_local(model, x, None, in_process=True, batch_size=2, drelu_width=64)
    rows = width_table(result.program, frac_bits=16, batch=2)
    measured = {l["name"]: l["bytes"] for l in result.report["layers"]}
    base = {l["name"]: l["bytes"] for l in plain.report["layers"]}
    assert {r["op"] for r in rows} == {"clamp", "max_pool", "hardswish", "adaptive_max_pool"}
    for row in rows:
        assert measured[row["layer"]] == row["bytes"], row["layer"]
        assert base[row["layer"]] == row["bytes_64"], row["layer"]
    assert bytes_saved_by_widths(result.program, [2]) == (plain.report["online"]["bytes"]
                                                          - result.report["online"]["bytes"])
