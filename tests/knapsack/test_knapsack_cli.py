"""End to end: distortion folder -> research/knapsack_patch_size_extractor.py -> block spec that
a real model accepts, within budget, and equal to the DP optimum of the same instance."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import secure_inference as si
from secure_inference.distortion.store import (DistortionFileError, SiteDistortion, load_results,
                                               save_meta, save_site, site_filename)
from secure_inference.knapsack import (all_relu_count, budget_from_ratio, check_against_sites,
                                       dp_mckp, knapsack_block_spec, site_table)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "research" / "knapsack_patch_size_extractor.py"
SHAPE = (3, 32, 32)


def load_cli():
    spec = importlib.util.spec_from_file_location("knapsack_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cli():
    return load_cli()


@pytest.fixture(scope="module")
def resnet18_sites():
    import torchvision
    model = torchvision.models.resnet18(num_classes=10)
    return si.find_relu_sites(model, SHAPE)


def write_folder(folder: Path, sites, seed: int = 0, include_identity: bool = True) -> None:
    """A synthetic distortion folder: decreasing in cost with noise, [1,1] exact."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in sites:
        sizes = si.candidate_block_sizes(s.height, s.width, include_identity=include_identity)
        costs = si.candidate_costs(sizes, s.height, s.width)
        removed = 1 - costs / costs.max()
        d = rng.lognormal(0, 1, (s.channels, 1)) * removed ** rng.uniform(0.5, 2, (s.channels, 1))
        d = d * rng.lognormal(0, 0.3, (s.channels, costs.size))
        save_site(folder, SiteDistortion(s.name, d, sizes, costs, s.channels, s.height, s.width,
                                         num_samples=4, seed=0))
    save_meta(folder, dict(model="resnet18", input_shape=list(SHAPE), num_samples=4, seed=0,
                           method="synthetic", sites=[s.name for s in sites]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, resnet18_sites):
    path = tmp_path_factory.mktemp("dist") / "r18"
    write_folder(path, resnet18_sites)
    return path


def test_cli_end_to_end_specs_fit_the_model(cli, folder, tmp_path, capsys):
    import torchvision
    out = tmp_path / "specs" / "r18.pickle"
    rc = cli.main(["--model", "resnet18", "--channel_distortion_path", str(folder),
                   "--ratio", "0.03", "0.1", "--block_size_spec_file_name", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "checked 17 sites against resnet18" in text
    meta, results = load_results(folder)
    total = all_relu_count(results)
    for ratio in ("0.03", "0.1"):
        path = tmp_path / "specs" / f"r18_{ratio}.pickle"
        budget = budget_from_ratio(float(ratio), total)
        assert f"budget {ratio}: DReLUs" in text and f"/ {budget:,}" in text
        for extra in (".sites.csv", ".sites.md", ".drelus.png"):
            assert (tmp_path / "specs" / f"r18_{ratio}{extra}").stat().st_size > 0
        spec = si.load_spec(path)
        model = torchvision.models.resnet18(num_classes=10).eval()
        sites = si.find_relu_sites(model, SHAPE)
        counts = si.count_drelus(spec, sites)
        assert counts["total"] <= budget
        assert counts["total"] >= 0.9 * budget       # the budget is actually used
        si.apply_block_spec(model, spec, SHAPE)
        assert si.extract_block_spec(model, SHAPE).keys() == spec.keys()
        with torch.no_grad():
            y = model(torch.randn(2, *SHAPE))
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        # the spec's rows are candidate sizes of their sites
        for name, sizes in spec.items():
            cand = {tuple(r) for r in results[name].block_sizes.tolist()}
            assert {tuple(r) for r in sizes.tolist()} <= cand


def test_spec_is_dp_optimal(folder):
    """The knapsack layer's choice has the optimum distortion of the same instance per DP."""
    _, results = load_results(folder)
    budget = budget_from_ratio(0.02, all_relu_count(results))
    sol = knapsack_block_spec(results, budget)
    costs, dists = [], []
    for r in results.values():
        costs += [r.costs] * r.channels
        dists += list(r.distortion)
    ref = dp_mckp(costs, dists, budget)
    assert math.isclose(sol.result.total_distortion, ref.total_distortion, rel_tol=1e-9)
    assert sol.result.gap <= 1e-9
    got = 0.0
    for name, r in results.items():
        for c, hw in enumerate(sol.spec[name]):
            k = np.flatnonzero((r.block_sizes == hw).all(1))[0]
            got += r.distortion[c, k]
    assert math.isclose(got, ref.total_distortion, rel_tol=1e-9)
    rows = site_table(results, sol.spec)
    assert sum(r["drelus_after"] for r in rows) == sol.result.total_cost <= budget


def test_single_max_cost_writes_exact_name(cli, folder, tmp_path, capsys):
    out = tmp_path / "one.pickle"
    assert cli.main(["--channel_distortion_path", str(folder), "--max_cost", "5000",
                     "--block_size_spec_file_name", str(out), "--no_plot"]) == 0
    assert "not checked against a model" in capsys.readouterr().out
    _, results = load_results(folder)
    spec = si.load_spec(out)
    assert sum(int(si.block_costs(spec[n], r.height, r.width).sum())
               for n, r in results.items()) <= 5000
    assert not (tmp_path / "one.drelus.png").exists() and (tmp_path / "one.sites.md").exists()


def test_check_against_sites_of_a_tiny_cnn(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
            self.conv2, self.act2 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()

        def forward(self, x):
            return self.act2(self.conv2(self.act1(self.conv1(x))))

    model = Tiny()
    sites = si.find_relu_sites(model, (3, 8, 8))
    write_folder(tmp_path / "tiny", sites)
    _, results = load_results(tmp_path / "tiny")
    check_against_sites(results, sites)
    sol = knapsack_block_spec(results, budget_from_ratio(0.25, all_relu_count(results)))
    assert si.count_drelus(sol.spec, sites)["total"] <= sol.budget
    si.apply_block_spec(model, sol.spec, (3, 8, 8))
    model(torch.randn(1, 3, 8, 8))
    other = si.find_relu_sites(Tiny(), (3, 16, 16))          # same names, other map sizes
    with pytest.raises(DistortionFileError, match="model gives"):
        check_against_sites(results, other)
    with pytest.raises(DistortionFileError, match="no results for 1 sites"):
        check_against_sites({k: v for k, v in results.items() if k != "act2"}, sites)


def run_cli_error(cli, capsys, argv):
    rc = cli.main(argv)
    assert rc == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(cli, folder, tmp_path, capsys, resnet18_sites):
    out = str(tmp_path / "o.pickle")
    base = ["--block_size_spec_file_name", out]
    for ratio in ("0", "1.5", "-0.1"):
        err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(folder),
                                          "--ratio", ratio] + base)
        assert "ratio must be in (0, 1]" in err
    err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(tmp_path / "nowhere"),
                                      "--ratio", "0.1"] + base)
    assert "no meta.json" in err

    # a missing site file
    broken = tmp_path / "missing"
    write_folder(broken, resnet18_sites[:3])
    (broken / site_filename(resnet18_sites[1].name)).unlink()
    err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(broken), "--ratio", "0.1"] + base)
    assert "is missing" in err

    # NaN distortions (written around save_site, which refuses them)
    nan = tmp_path / "nan"
    write_folder(nan, resnet18_sites[:2])
    s = resnet18_sites[0]
    path = nan / site_filename(s.name)
    with np.load(path) as z:
        data = dict(z)
    data["distortion"][3, 2] = np.nan
    np.savez(path, **data)
    err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(nan), "--ratio", "0.1"] + base)
    assert "NaN/inf" in err

    # costs that disagree with the block sizes
    data["distortion"][3, 2] = 0.5
    data["costs"] = data["costs"] + 1
    np.savez(path, **data)
    err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(nan), "--ratio", "0.1"] + base)
    assert "inconsistent" in err

    # wrong channel count in a file
    data["costs"] = data["costs"] - 1
    data["channels"] = np.array(int(data["channels"]) + 1)
    np.savez(path, **data)
    err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(nan), "--ratio", "0.1"] + base)
    assert "expected [" in err

    # sites that the model does not have
    partial = tmp_path / "renamed"
    renamed = [si.ReluSite("not_a_site", "ReLU", "x", 0, s.channels, s.height, s.width)
               for s in resnet18_sites[:1]]
    write_folder(partial, renamed)
    err = run_cli_error(cli, capsys, ["--model", "resnet18", "--channel_distortion_path",
                                      str(partial), "--ratio", "0.1"] + base)
    assert "not sites of the model" in err
    err = run_cli_error(cli, capsys, ["--model", "no_such_model_xyz", "--channel_distortion_path",
                                      str(partial), "--ratio", "0.1"] + base)
    assert "could not build the model from no_such_model_xyz" in err

    # budget below the smallest achievable cost: no identity candidate, tiny budget
    noid = tmp_path / "noid"
    write_folder(noid, resnet18_sites[:2], include_identity=False)
    err = run_cli_error(cli, capsys, ["--channel_distortion_path", str(noid), "--max_cost", "3"]
                        + base)
    assert "below the smallest achievable total cost" in err


@pytest.mark.processes
def test_runs_as_a_script(folder, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0
    assert "--channel_distortion_path" in proc.stdout and "_<ratio>" in proc.stdout
    out = tmp_path / "s.pickle"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--channel_distortion_path", str(folder),
                           "--max_cost", "3000", "--block_size_spec_file_name", str(out),
                           "--no_plot"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "budget cost3000: DReLUs" in proc.stdout and "(optimal)" in proc.stdout
    assert si.load_spec(out)


def test_config_check(cli, tmp_path, capsys):
    """--config builds the MMLab model and checks names, shapes and the declared input size."""
    from secure_inference.models import load_model
    config = str(ROOT / "configs" / "classification" / "resnet18_cifar100.py")
    sites = si.find_relu_sites(load_model(config), SHAPE)
    write_folder(tmp_path / "cfg", sites, seed=3)
    out = tmp_path / "c.pickle"
    assert cli.main(["--config", config, "--channel_distortion_path", str(tmp_path / "cfg"),
                     "--ratio", "0.06", "--block_size_spec_file_name", str(out),
                     "--no_plot"]) == 0
    assert f"checked {len(sites)} sites against {config}" in capsys.readouterr().out
    assert si.count_drelus(si.load_spec(out), sites)["total"] <= budget_from_ratio(
        0.06, sum(s.num_relus for s in sites))
    meta_path = tmp_path / "cfg" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["input_shape"] = [3, 64, 64]
    meta_path.write_text(json.dumps(meta))
    err = run_cli_error(cli, capsys, ["--config", config, "--channel_distortion_path",
                                      str(tmp_path / "cfg"), "--ratio", "0.06",
                                      "--block_size_spec_file_name", str(out)])
    assert "declares input_shape [3, 32, 32]" in err


def test_budget_and_site_table_by_hand():
    assert budget_from_ratio(0.06, 557_056) == 33_423
    assert budget_from_ratio(0.3, 10) == 3          # 0.3 * 10 = 2.9999999999999996 in floats
    assert budget_from_ratio(1, 9_608_704) == 9_608_704
    for bad in (0, -0.5, 1.0001, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            budget_from_ratio(bad, 100)
    sizes = np.array([[1, 1], [2, 2], [0, 1]], dtype=np.int32)
    r = SiteDistortion("s", np.zeros((4, 3)), sizes, si.candidate_costs(sizes, 4, 6), 4, 4, 6, 1, 0)
    spec = {"s": np.array([[2, 2], [0, 1], [0, 1], [1, 1]], dtype=np.int32)}
    (row,) = site_table({"s": r}, spec)
    assert row["drelus_before"] == 96 and row["drelus_after"] == 6 + 24
    assert row["identity_share"] == 0.5 and row["common_sizes"].startswith("identity:2")


def test_existing_outputs_are_not_overwritten_without_force(cli, folder, tmp_path, capsys):
    out = tmp_path / "spec.pickle"
    argv = ["--channel_distortion_path", str(folder), "--max_cost", "5000",
            "--block_size_spec_file_name", str(out), "--no_plot"]
    assert cli.main(argv) == 0
    md = tmp_path / "spec.sites.md"
    mine = {out: b"my spec", md: b"my notes"}
    for path, data in mine.items():
        path.write_bytes(data)
    capsys.readouterr()
    err = run_cli_error(cli, capsys, argv)
    assert f"{out}" in err and f"{md}" in err and "--force" in err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in mine} == mine           # nothing touched
    # only the .sites.md left over (spec and csv deleted): still refused, naming that file
    out.unlink()
    (tmp_path / "spec.sites.csv").unlink()
    err = run_cli_error(cli, capsys, argv)
    assert f"{md} already exists" in err and not out.exists()
    # several budgets: each derived name is checked before any budget is solved
    (tmp_path / "multi_cost7000.pickle").write_bytes(b"keep")
    multi = ["--channel_distortion_path", str(folder), "--max_cost", "5000", "7000",
             "--block_size_spec_file_name", str(tmp_path / "multi.pickle"), "--no_plot"]
    err = run_cli_error(cli, capsys, multi)
    assert "multi_cost7000.pickle" in err and not (tmp_path / "multi_cost5000.pickle").exists()
    # --force overwrites
    assert cli.main(argv + ["--force"]) == 0
    assert si.load_spec(out) and md.read_bytes() != b"my notes"
