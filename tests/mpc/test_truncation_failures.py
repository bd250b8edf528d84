"""Catastrophic local-truncation failures: the per-value probability |v| / 2^64 against a
simulation of the two shares, and the per-image expectation of
:func:`~secure_inference.mpc.compile.truncation_failures` against the failures counted in real
secure runs of a network tuned to fail often (large inputs, many fractional bits)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secure_inference.mpc.compile import compile_model, run_float, truncation_failures
from secure_inference.mpc.local import run_program
from secure_inference.mpc.prg import private_stream
from secure_inference.mpc.ring import truncate_share


@pytest.mark.parametrize("bits", [56, 58])
def test_one_truncation_fails_with_probability_v_over_2_64(bits):
    n = 400_000
    v = torch.full((n,), 3 << bits, dtype=torch.int64)
    x0 = private_stream().ring((n,))
    x1 = v - x0
    got = truncate_share(x0, 16, 0) + truncate_share(x1, 16, 1)
    failures = int(((got - (v >> 16)).abs() > 1).sum())
    expected = n * (3 << bits) / 2 ** 64
    assert abs(failures - expected) < 5 * math.sqrt(expected) + 1, (failures, expected)


def test_expected_failures_per_image_match_secure_runs():
    """f = 24 and inputs up to 1500 put conv outputs near 2^58 on the ring before the shift:
    a failure every few images; the analysis must predict the count seen in 48 images."""
    frac = 24
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(-0.12, 0.12)
    x = (torch.rand(48, 2, 6, 6) * 2 - 1) * 1500
    program, weights = compile_model(model, (48, 2, 6, 6))
    predicted = truncation_failures(program, weights, x, frac)
    assert predicted["values"] == 4 * 36
    assert set(predicted["by_layer"]) == {program.layers[1].name}
    res = run_program(program, weights, [x], frac_bits=frac, in_process=True)
    plain = run_float(program, weights, x.double())
    err = (res[0]["outputs"][0] - plain).abs()
    seen = int((err > 1000).sum())          # a failure is off by about 2^(64 − 2f) = 65536
    assert int(((err > 1e-3) & (err < 1000)).sum()) == 0
    expected = predicted["per_image"] * x.shape[0]
    assert 5 < expected < 100
    assert abs(seen - expected) < 5 * math.sqrt(expected), (seen, expected)


def test_failures_grow_four_times_per_fractional_bit():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3),
                          nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.randn(2, 3, 6, 6)
    program, weights = compile_model(model, (2, 3, 6, 6))
    f12, f16 = (truncation_failures(program, weights, x, f) for f in (12, 16))
    assert len(f16["by_layer"]) == 3                       # conv, average pool, linear
    assert 200 < f16["per_image"] / f12["per_image"] < 300  # 2^8 (avg pool: 2^(f+k), k grows too)
    assert f16["per_image"] < 1e-6


@pytest.mark.processes
def test_error_bound_and_run_local_report_state_the_expected_failures(tmp_path):
    import json

    from secure_inference.mpc.compile import error_bound
    from secure_inference.mpc.local import run_local
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    program, weights = compile_model(model, tuple(x.shape))
    bound, failures = error_bound(program, weights, x, 16, with_failures=True)
    assert torch.equal(bound, error_bound(program, weights, x, 16))
    assert failures == truncation_failures(program, weights, x, 16)
    res = run_local(model, x, in_process=True, report_path=tmp_path / "r.json")
    acc = json.loads((tmp_path / "r.json").read_text())["accuracy"]
    assert acc["frac_bits"] == 16
    assert acc["expected_truncation_failures_per_image"] == pytest.approx(failures["per_image"])
    assert acc["truncated_values_per_image"] == failures["values"] > 0
    assert res.report["accuracy"] == acc


def test_run_local_reports_the_ambiguous_block_decisions():
    """Patch sums within the fixed-point error of zero (issue 22 item 2): the report counts
    them per image, as error_std finds them."""
    import numpy as np

    from secure_inference.mpc.compile import error_std
    from secure_inference.mpc.local import run_local
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight[1:3].zero_()   # channels 1, 2: sums exactly 0 (bias 0): ambiguous
        model[0].bias[1:3].zero_()
    spec = {"1": np.array([[2, 2]] * 4, dtype=np.int32)}
    x = torch.randn(2, 3, 8, 8)
    res = run_local(model, x, spec, in_process=True)
    program, weights = compile_model(model, tuple(x.shape), spec=spec)
    _, ambiguous = error_std(program, weights, x.double(), 16)
    per_image = res.report["accuracy"]["ambiguous_block_decisions_per_image"]
    assert per_image == len(ambiguous) / 2 >= 2 * 16   # two channels of 4x4 patches each
