"""The knapsack on bytes: every option priced by the bytes the secure runtime sends for it.

Prices per option against a plain computation from the protocol's message list; byte budgets
respected by the exact bytes (not only by the linear price) and solved to the DP optimum; and,
for a whole small network run under secure inference, the knapsack's exact bytes per site equal
the bytes the runtime measured for that site's layer, at 64 bits, at 27 bits and at calibrated
per-site widths."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import secure_inference as si
from secure_inference.distortion.store import SiteDistortion, load_results
from secure_inference.knapsack import (all_relu_bytes, budget_from_ratio, byte_budget_units,
                                       dp_mckp, knapsack_block_spec, option_units, site_bytes,
                                       site_table, site_table_markdown, site_widths,
                                       spec_site_bytes)
from secure_inference.widths import Calibration

from helpers.nets import TinyResNet, init_net

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- a plain, independent account

def plain_layer_bytes(sizes, height, width, ell):
    """Bytes of one fused DReLU layer, counted message by message (docs/secure_inference.md):
    the helper deals r' bits (n(ℓ−1) values mod 67) and the two PrivateCompare messages carry
    as many each, packed five per 4-byte word; the masked value is opened both ways (⌈ℓ/8⌉
    bytes each); the helper sends one 8-byte output share per decision; every multiplied pixel
    costs 8 + 8 (masked shares to the helper) + 8 (a share back)."""
    n = m = 0
    for h, w in np.asarray(sizes).tolist():
        if h == 0 or w == 0:
            continue
        n += math.ceil(height / h) * math.ceil(width / w)
        m += height * width
    if n == 0:
        return 0
    words = math.ceil(n * (ell - 1) / 5)
    return 3 * 4 * words + 2 * n * math.ceil(ell / 8) + 8 * n + (8 + 8 + 8) * m


def plain_option_price(h, w, height, width, ell):
    """Per-channel linear price in bytes (a Fraction): the packing amortised."""
    if h == 0 or w == 0:
        return Fraction(0)
    patches = math.ceil(height / h) * math.ceil(width / w)
    per_decision = Fraction(3 * 4 * (ell - 1), 5) + 2 * math.ceil(ell / 8) + 8
    return per_decision * patches + 24 * height * width


def make_site(name, channels, height, width, seed=0, identity_free=False):
    rng = np.random.default_rng(seed)
    sizes = si.candidate_block_sizes(height, width, include_identity=True)
    costs = si.candidate_costs(sizes, height, width)
    ident = costs == 0
    # [1,1] exact, bigger patches worse, identity worst (unless free): a mix gets chosen
    d = rng.lognormal(0, 1, (channels, 1)) * (1 - costs / costs.max()) ** rng.uniform(0.3, 2, (channels, 1))
    d = d * rng.lognormal(0, 0.3, (channels, costs.size))
    d[:, ident] = 0.0 if identity_free else 1.5 * d.max(1, keepdims=True)
    return SiteDistortion(name, d, sizes, costs, channels, height, width, num_samples=2, seed=0)


# ---------------------------------------------------------------- prices

@pytest.mark.parametrize("ell", [3, 8, 9, 27, 33, 64])
def test_option_prices_equal_a_plain_computation(ell):
    for height, width in [(8, 8), (7, 5), (1, 1), (16, 12)]:
        r = make_site("s", 3, height, width)
        units = option_units(r, ell)
        assert units.dtype == np.int64
        for (h, w), u in zip(r.block_sizes.tolist(), units.tolist()):
            price = plain_option_price(h, w, height, width, ell)
            assert Fraction(u, 5) == price, (h, w, height, width, ell)
        # the exact layer bytes of any spec: never below the summed linear prices, at most
        # 9.6 bytes above them (the three packed messages' rounding)
        rng = np.random.default_rng(ell + height)
        for _ in range(20):
            sizes = r.block_sizes[rng.integers(0, len(r.block_sizes), 11)]
            exact = site_bytes(sizes, height, width, ell)
            assert exact == plain_layer_bytes(sizes, height, width, ell)
            linear = sum(plain_option_price(h, w, height, width, ell) for h, w in sizes.tolist())
            assert 0 <= exact - linear <= Fraction(48, 5)
    assert site_bytes(np.array([[0, 1], [0, 1]]), 4, 4, ell) == 0   # all identity: no layer


def test_widths_uniform_and_calibrated():
    names = ["a", "b", "c"]
    assert site_widths(names) == {"a": 64, "b": 64, "c": 64}
    assert site_widths(names, drelu_width=27) == {"a": 27, "b": 27, "c": 27}
    with pytest.raises(ValueError, match=r"\[3, 64\]"):
        site_widths(names, drelu_width=2)
    cal = Calibration(ranges={"a": 2.0, "b": 1000.0}, margin=8.0)
    w = site_widths(names, calibration=cal, frac_bits=16)
    # 2 · 8 · 2^16 + 256 < 2^21 → 22 bits; 1000 · 8 · 2^16 + 256 < 2^29 → 30 bits; c: 64
    assert w == {"a": 22, "b": 30, "c": 64}
    assert site_widths(names, calibration=cal, frac_bits=16, margin=1.0)["a"] == 19


# ---------------------------------------------------------------- budgets

def tiny_results(identity_free_site=None):
    shapes = [("s0", 4, 4, 4), ("s1", 6, 2, 2), ("s2", 3, 3, 5)]
    return {n: make_site(n, c, h, w, seed=i, identity_free=(n == identity_free_site))
            for i, (n, c, h, w) in enumerate(shapes)}


@pytest.mark.parametrize("ell", [64, 27])
def test_byte_budget_respected_and_dp_optimal(ell):
    results = tiny_results()
    widths = {n: ell for n in results}
    full = all_relu_bytes(results, widths)
    assert full == sum(plain_layer_bytes(np.ones((r.channels, 2)), r.height, r.width, ell)
                       for r in results.values())
    rounded = 0
    for ratio in (0.05, 0.13, 0.3, 0.55, 0.8, 1.0):
        budget = budget_from_ratio(ratio, full)
        sol = knapsack_block_spec(results, budget, cost="bytes", widths=widths)
        exact = sum(plain_layer_bytes(sol.spec[n], r.height, r.width, ell)
                    for n, r in results.items())
        assert sol.bytes == exact <= budget and sol.total_bytes == full
        assert sol.drelus == sum(int(si.block_costs(sol.spec[n], r.height, r.width).sum())
                                 for n, r in results.items())
        assert sol.result.optimal and sol.result.gap <= 1e-9
        rounded += 5 * exact != sol.result.total_cost     # the packing's rounding showed up
        # the same instance by the cost-indexed DP (prices in fifths of a byte)
        costs, dists = [], []
        for n, r in results.items():
            costs += [option_units(r, ell)] * r.channels
            dists += list(r.distortion)
        ref = dp_mckp(costs, dists, byte_budget_units(budget, len(results)))
        assert math.isclose(sol.result.total_distortion, ref.total_distortion, rel_tol=1e-9,
                            abs_tol=1e-12)
        if ratio < 1:
            assert sol.bytes >= 0.8 * budget   # the budget binds and is used
    assert rounded > 0


def test_bad_byte_budgets():
    results = tiny_results()
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="whole number >= 0"):
            knapsack_block_spec(results, bad, cost="bytes")
    with pytest.raises(ValueError, match="cost must be one of"):
        knapsack_block_spec(results, 10, cost="watts")
    sol = knapsack_block_spec(results, 0, cost="bytes")      # all identity: nothing sent
    assert sol.bytes == 0 and sol.drelus == 0


def test_site_table_has_bytes():
    results = tiny_results()
    sol = knapsack_block_spec(results, 4000, cost="bytes", widths={"s0": 27})
    rows = site_table(results, sol.spec, widths=sol.widths)
    assert [r["drelu_width"] for r in rows] == [27, 64, 64]
    for row, (n, r) in zip(rows, results.items()):
        ell = row["drelu_width"]
        assert row["bytes_after"] == plain_layer_bytes(sol.spec[n], r.height, r.width, ell)
        assert row["bytes_before"] == plain_layer_bytes(np.ones((r.channels, 2)), r.height,
                                                        r.width, ell)
    assert sum(r["bytes_after"] for r in rows) == sol.bytes <= 4000
    md = site_table_markdown(rows)
    assert f"{sol.bytes:,}" in md and "bytes after" in md


# ---------------------------------------------------------------- against the runtime

SHAPE = (3, 8, 8)


def network_results(sites):
    """Synthetic distortion for every site of TinyResNet; the ReLU after the linear layer has
    only [1,1] (the runtime's Block-ReLU takes [N, C, H, W] inputs), layer1.relu#0 loses
    nothing by identity (so the whole site goes and its layer disappears)."""
    out = {}
    for i, s in enumerate(sites):
        if s.height == 1 and s.width == 1:
            sizes = np.array([[1, 1]], dtype=np.int32)
            out[s.name] = SiteDistortion(s.name, np.zeros((s.channels, 1)), sizes,
                                         si.candidate_costs(sizes, 1, 1), s.channels, 1, 1, 2, 0)
        else:
            out[s.name] = make_site(s.name, s.channels, s.height, s.width, seed=10 + i,
                                    identity_free=(s.name == "layer1.relu#0"))
    return out


def measured_site_bytes(report):
    return {layer["name"]: layer["bytes"] for layer in report["layers"]
            if layer["op"] in ("relu", "block_relu")}


@pytest.mark.parametrize("mode", ["64", "27", "calibrated"])
def test_knapsack_bytes_equal_the_runtime_bytes(mode):
    from secure_inference.mpc import run_local

    model = init_net(TinyResNet(4), 0)
    sites = si.find_relu_sites(model, SHAPE)
    results = network_results(sites)
    assert set(results) == {s.name for s in sites}
    cal = None
    if mode == "calibrated":   # recorded ranges for two sites, the others stay at 64 bits
        cal = Calibration(ranges={"stem.2": 4.0, "layer2.relu#0": 0.5}, margin=8.0)
        widths = site_widths(results, calibration=cal, frac_bits=16)
        assert widths["stem.2"] == 23 and widths["layer2.relu#0"] == 20
        assert widths["pre.act"] == 64
    else:
        widths = site_widths(results, drelu_width=int(mode))
    sol = knapsack_block_spec(results, budget_from_ratio(0.3, all_relu_bytes(results, widths)),
                              cost="bytes", widths=widths)
    spec = sol.spec
    # the chosen spec exercises every case: identity, [1,1], bigger patches, a whole site gone
    rows = np.concatenate([v for v in spec.values()])
    assert (rows[:, 0] == 0).any() and ((rows == 1).all(1)).any() and (rows.max(1) > 1).any()
    assert (spec["layer1.relu#0"][:, 0] == 0).all()
    mixed = [n for n, v in spec.items() if 0 < (v[:, 0] == 0).sum() < len(v)]
    assert mixed, "no site mixes identity and non-identity channels"
    expected = spec_site_bytes(results, spec, widths)
    assert expected["layer1.relu#0"] == 0

    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    if mode == "calibrated":
        res = run_local(model, x, si.spec.BlockSpec(spec, cal), in_process=True, timeout=300)
    else:
        res = run_local(model, x, spec, in_process=True, timeout=300,
                        drelu_bits=None if mode == "64" else int(mode))
    measured = measured_site_bytes(res.report)
    assert measured == {n: b for n, b in expected.items() if b}     # per layer, per image
    assert sum(measured.values()) == sol.bytes <= sol.budget
    if mode == "calibrated":    # the runtime compared at the widths the knapsack priced
        got = {layer["name"]: layer["drelu_width"] for layer in res.report["layers"]
               if layer["name"] in measured}
        assert got == {n: (widths[n] if n in cal.ranges else "session") for n in measured}


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "knapsack_cli_bytes", ROOT / "research" / "knapsack_patch_size_extractor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_tiny_folder(folder: Path, results) -> Path:
    from secure_inference.distortion.store import save_meta, save_site
    folder.mkdir(parents=True, exist_ok=True)
    for r in results.values():
        save_site(folder, r)
    save_meta(folder, dict(model="tiny", input_shape=list(SHAPE), num_samples=2, seed=0,
                           method="synthetic", sites=list(results)))
    return folder


def test_cli_byte_budgets(cli, tmp_path, capsys):
    folder = write_tiny_folder(tmp_path / "dist", tiny_results())
    _, results = load_results(folder)
    out = tmp_path / "b.pickle"
    assert cli.main(["--channel_distortion_path", str(folder), "--max-bytes", "5e3", "9000",
                     "--drelu-width", "27", "--block_size_spec_file_name", str(out)]) == 0
    text = capsys.readouterr().out
    assert "27-bit comparison" in text and "budgets count bytes per image" in text
    for budget in (5000, 9000):
        path = tmp_path / f"b_bytes{budget}.pickle"
        spec = si.load_spec(path)
        sent = sum(plain_layer_bytes(spec[n], r.height, r.width, 27) for n, r in results.items())
        assert sent <= budget and f"budget bytes{budget}: bytes {sent:,} / {budget:,}" in text
        assert (tmp_path / f"b_bytes{budget}.bytes.png").stat().st_size > 0
        assert not (tmp_path / f"b_bytes{budget}.drelus.png").exists()
        csv = (tmp_path / f"b_bytes{budget}.sites.csv").read_text().splitlines()
        assert "bytes_after" in csv[0] and "drelu_width" in csv[0]
    # --ratio with --cost bytes: a share of the all-ReLU bytes at the same widths
    full = all_relu_bytes(results)
    assert cli.main(["--channel_distortion_path", str(folder), "--cost", "bytes", "--ratio",
                     "0.2", "--block_size_spec_file_name", str(tmp_path / "r.pickle"),
                     "--no_plot"]) == 0
    text = capsys.readouterr().out
    spec = si.load_spec(tmp_path / "r.pickle")
    sent = sum(plain_layer_bytes(spec[n], r.height, r.width, 64) for n, r in results.items())
    assert sent <= budget_from_ratio(0.2, full) and f"all-ReLU bytes {full:,}" in text
    # the DReLU cost stays the default, and reports bytes too
    assert cli.main(["--channel_distortion_path", str(folder), "--ratio", "0.2",
                     "--block_size_spec_file_name", str(tmp_path / "d.pickle")]) == 0
    text = capsys.readouterr().out
    assert "budget 0.2: DReLUs" in text and "bytes" in text
    assert (tmp_path / "d.drelus.png").exists() and not (tmp_path / "d.bytes.png").exists()


def test_cli_calibrated_widths_and_errors(cli, tmp_path, capsys):
    folder = write_tiny_folder(tmp_path / "dist", tiny_results())
    _, results = load_results(folder)
    calibrated = tmp_path / "cal.pickle"
    cal = Calibration(ranges={"s0": 2.0}, margin=8.0, frac_bits=16)
    si.save_spec({}, calibrated, calibration=cal)
    out = tmp_path / "c.pickle"
    assert cli.main(["--channel_distortion_path", str(folder), "--max-bytes", "6000",
                     "--calibration", str(calibrated), "--block_size_spec_file_name", str(out),
                     "--no_plot"]) == 0
    text = capsys.readouterr().out
    assert "1 of 3 sites calibrated, widths 22..64 bits" in text
    spec = si.load_spec(out)
    widths = {"s0": 22, "s1": 64, "s2": 64}
    sent = sum(plain_layer_bytes(spec[n], r.height, r.width, widths[n])
               for n, r in results.items())
    assert sent <= 6000 and f"bytes {sent:,} / 6,000" in text
    md = (tmp_path / "c.sites.md").read_text()
    assert "| s0 | 4 | 4×4 |" in md and " | 22 | " in md

    def error(argv):
        assert cli.main(argv + ["--channel_distortion_path", str(folder),
                                "--block_size_spec_file_name", str(tmp_path / "e.pickle")]) == 2
        return capsys.readouterr().err

    assert "--max_cost counts DReLUs" in error(["--cost", "bytes", "--max_cost", "10"])
    assert "--max-bytes needs --cost bytes" in error(["--cost", "drelus", "--max-bytes", "10"])
    si.save_spec({}, tmp_path / "plain.pickle")
    assert "carries no calibration" in error(["--max-bytes", "10", "--calibration",
                                              str(tmp_path / "plain.pickle")])
    si.save_spec({}, tmp_path / "other.pickle", calibration=Calibration(ranges={"zz": 1.0}))
    assert "lists none of the 3 sites" in error(["--max-bytes", "10", "--calibration",
                                                 str(tmp_path / "other.pickle")])
    assert "--margin applies to --calibration" in error(["--max-bytes", "10", "--margin", "2"])
    assert "ratio must be in (0, 1] (a share of the all-ReLU bytes per image)" in error(
        ["--cost", "bytes", "--ratio", "1.5"])
    with pytest.raises(SystemExit):
        cli.main(["--channel_distortion_path", str(folder), "--max-bytes", "1.5",
                  "--block_size_spec_file_name", str(tmp_path / "e.pickle")])
    assert "whole number >= 0" in capsys.readouterr().err


def test_help_explains_the_costs(cli, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--cost", "--max-bytes", "--drelu-width", "--calibration", "--frac-bits",
                 "--margin", "24 bytes per multiplied pixel", ".bytes.png"):
        assert flag in text, flag
