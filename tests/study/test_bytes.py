"""The study's byte accounting (issue 21 item 5): the knapsack on bytes at the count
knapsack's exact bytes per image, bytes recorded per spec and run, the bytes column and plot,
and results files from before bytes were recorded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from secure_inference.study import Budget, ResultsFile, SpecBuilder, resolve_budgets
from secure_inference.study.methods import METHODS, spec_wire_bytes
from secure_inference.study.report import aggregate, format_table, plot_bytes
from secure_inference.study.runs import SETTING_DEFAULTS, Study
from secure_inference.wire_costs import mul_drelu_bytes

SHAPE = (3, 10, 10)


def net_with_a_functional_relu() -> nn.Module:
    """Three ReLU modules and one functional ReLU (a fixed site: it stays all ReLU)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.ReLU())
            self.last = nn.Conv2d(2, 2, 1)
            self.fc = nn.Linear(18, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.last(self.body(x))).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def plain_bytes(spec, sites, width) -> int:
    """Exact bytes per image from the runtime's per-layer formula, counted by hand: per site
    the patches of every non-identity channel (a [1,1] channel: every pixel) and H·W pixels
    per non-identity channel, in one fused DReLU-multiplication."""
    total = 0
    for s in sites:
        rows = spec.get(s.name, [[1, 1]] * s.channels)
        decisions = pixels = 0
        for h, w in rows:
            if h == 0 or w == 0:
                continue
            decisions += math.ceil(s.height / h) * math.ceil(s.width / w)
            pixels += s.height * s.width
        if decisions:
            total += mul_drelu_bytes(decisions, pixels, width)
    return total


@pytest.fixture(scope="module", params=[64, 16])
def builder(request, tmp_path_factory):
    torch.manual_seed(1)
    return SpecBuilder(net_with_a_functional_relu(), torch.randn(6, *SHAPE),
                       tmp_path_factory.mktemp("dist"), model_id="small",
                       bytes_width=request.param)


def test_method_is_listed_and_reads_exact_distortion():
    assert METHODS["knapsack_bytes"].distortion == "exact"
    assert not METHODS["knapsack_bytes"].distill


@pytest.mark.parametrize("token", ["2x2", "3x3", "0.15"])
def test_bytes_knapsack_is_solved_at_the_count_knapsacks_exact_bytes(builder, token):
    sites = builder.sites
    assert any(s.functional for s in sites)           # a fixed site is counted in both
    budget = resolve_budgets([token], sites)[0]
    count = builder.build("knapsack", budget)
    by_bytes = builder.build("knapsack_bytes", budget)
    width = builder.bytes_width
    # the bound is the count knapsack's exact bytes per image at the same width
    bound = plain_bytes(count.spec, sites, width)
    assert count.bytes == bound == by_bytes.details["byte_budget"]
    assert by_bytes.details["bytes_width"] == width
    # and the byte knapsack's spec respects it, counted by hand
    assert by_bytes.bytes == plain_bytes(by_bytes.spec, sites, width) <= bound
    # the replaceable part of the bound is what the solver was given; the fixed site's
    # all-ReLU bytes make up the rest
    fixed = [s for s in sites if s.functional]
    assert by_bytes.details["byte_budget_replaceable"] == bound - plain_bytes({}, fixed, width)
    # the byte knapsack spends its bytes at least as well as uniform specs that fit them: on
    # its own proxy (summed distortion) it is never worse than any of them
    results = builder.distortion("exact")
    for size in [(2, 2), (3, 3), (4, 4), (5, 5)]:
        uni = {n: np.tile([[min(size[0], r.height), min(size[1], r.width)]],
                          (r.channels, 1)) for n, r in results.items()}
        # a uniform spec within the byte budget less the packing reserve is feasible for the
        # solver, so its proxy distortion bounds the solver's optimum
        if plain_bytes(uni, sites, width) + 10 * len(sites) <= bound:
            assert (spec_distortion(results, by_bytes.spec)
                    <= spec_distortion(results, uni) + 1e-12)


def spec_distortion(results, spec):
    total = 0.0
    for name, r in results.items():
        keys = [tuple(int(v) for v in b) for b in r.block_sizes]
        for c, hw in enumerate(spec[name]):
            total += r.distortion[c, keys.index(tuple(int(v) for v in hw))]
    return total


def test_bytes_knapsack_spends_fewer_drelu_bytes_than_a_drelu_count_suggests(builder):
    """At equal bytes the byte knapsack is free to trade DReLUs for multiplied pixels: on this
    net its spec is not the count knapsack's (else the method would be the same)."""
    budget = resolve_budgets(["2x2"], builder.sites)[0]
    count = builder.build("knapsack", budget)
    by_bytes = builder.build("knapsack_bytes", budget)
    assert any(not np.array_equal(count.spec[n], by_bytes.spec[n]) for n in count.spec)


def test_wire_bytes_match_the_compiled_program():
    """spec_wire_bytes is the bytes the compiled secure program sends per image at 64 bits."""
    from secure_inference.mpc.calibrate import width_table
    from secure_inference.mpc.trace import compile_model
    from secure_inference.sites import find_relu_sites
    net = net_with_a_functional_relu()
    sites = find_relu_sites(net, SHAPE)
    spec = {sites[0].name: np.array([[2, 2], [0, 1], [1, 1]], np.int32),
            sites[1].name: np.array([[3, 3], [2, 1]], np.int32)}
    program, _ = compile_model(net, (1,) + SHAPE, spec=spec, drelu_width=64)
    compiled = sum(r["bytes_64"] for r in width_table(program))
    assert spec_wire_bytes(spec, sites, 64) == compiled == plain_bytes(spec, sites, 64)


def old_and_new_results():
    runs = {}
    for m, accs, nbytes in (("knapsack", [0.90, 0.92, 0.91], 5000),
                            ("knapsack_bytes", [0.91, 0.93, 0.92], 4990)):
        for s, a in enumerate(accs):
            runs[f"{m}@4x4#seed{s}"] = dict(method=m, budget="4x4", seed=s, accuracy=a,
                                            drelus=98, budget_drelus=100, bytes=nbytes)
    # a run from before bytes were recorded, whose spec entry has none either
    runs["uniform@4x4#seed0"] = dict(method="uniform", budget="4x4", seed=0, accuracy=0.85,
                                     drelus=100, budget_drelus=100)
    # one whose spec entry has them (recorded by a later rerun)
    runs["linearisation@4x4#seed0"] = dict(method="linearisation", budget="4x4", seed=0,
                                           accuracy=0.86, drelus=97, budget_drelus=100)
    return {"settings": {"bytes_width": 64}, "runs": runs,
            "budgets": {"4x4": {"drelus": 100}},
            "specs": {"linearisation@4x4": {"drelus": 97, "bytes": 4321}},
            "baseline": {"accuracy": 0.93, "drelus": 1000, "test_images": 10,
                         "bytes": 20000}}


def test_bytes_column_and_plot(tmp_path):
    data = old_and_new_results()
    rows = {r["method"]: r for r in aggregate(data)}
    assert rows["knapsack"]["bytes"] == 5000 and rows["knapsack_bytes"]["bytes"] == 4990
    assert rows["uniform"]["bytes"] is None and rows["linearisation"]["bytes"] == 4321
    assert rows["knapsack_bytes"]["accuracies"] == [0.91, 0.93, 0.92]
    table = format_table(data)
    assert "bytes/img (ℓ=64)" in table
    assert "| 4x4 (100) | knapsack_bytes | 98 | 9.80 | 4,990 | 3 | 92.00 ± 1.00 |" in table
    assert "| 4x4 (100) | uniform | 100 | 10.00 | - | 1 | 85.00 |" in table
    assert "| 4x4 | knapsack_bytes | -1.00 |" in table
    png = plot_bytes(data, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # a results file with no bytes at all still gives a table and an (empty) plot
    for run in data["runs"].values():
        run.pop("bytes", None)
    data["specs"] = {}
    assert all(r["bytes"] is None for r in aggregate(data))
    assert plot_bytes(data, tmp_path / "none.png").is_file()


def test_old_settings_without_bytes_width_resume_at_64_only(tmp_path):
    path = tmp_path / "results.json"
    old = ResultsFile(path)
    old.check_settings({"num_samples": 4})            # a file made before bytes_width
    old.save()
    ResultsFile(path).check_settings({"num_samples": 4, "bytes_width": 64}, SETTING_DEFAULTS)
    with pytest.raises(ValueError, match="bytes_width"):
        ResultsFile(tmp_path / "results.json").check_settings(
            {"num_samples": 4, "bytes_width": 16}, SETTING_DEFAULTS)
    fresh = ResultsFile(tmp_path / "other.json")
    fresh.check_settings({"num_samples": 4, "bytes_width": 16}, SETTING_DEFAULTS)
    assert fresh.data["settings"]["bytes_width"] == 16


def test_study_refuses_a_width_outside_the_ring():
    study = Study("c.py", "c.pth", "w", ["4x4"], ["knapsack_bytes"], [0], bytes_width=2)
    with pytest.raises(ValueError, match="bytes_width"):
        study.check()
    assert "bytes_width" in Study("c.py", "c.pth", "w", ["4x4"], ["knapsack"], [0]).settings()


def test_budget_labels_are_unaffected():
    assert Budget("4x4", 10, (4, 4)).slug == "4x4"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import tiny_study
    return tiny_study.write_tiny_study(tmp_path_factory.mktemp("tiny_bytes"))


def test_compare_records_bytes_and_plots_them(tiny, tmp_path, capsys):
    """compare_methods with knapsack and knapsack_bytes: both specs and runs carry their exact
    bytes per image (the finetuned model's own, counted again here), the byte knapsack is
    solved at the count knapsack's bytes, and the table and the bytes plot are written."""
    import json

    from secure_inference.cli import compare_methods
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import load_finetuned
    from secure_inference.sites import find_relu_sites
    from secure_inference.spec import extract_block_spec, load_spec

    cfg, ckpt = tiny
    work = tmp_path / "work"
    assert compare_methods.main([str(cfg), str(ckpt), "--work-dir", str(work), "--budgets",
                                 "4x4", "--methods", "knapsack", "knapsack_bytes", "--seeds",
                                 "0", "--num-samples", "4", "--bytes-width", "32"]) == 0
    assert "accuracy_vs_bytes.png" in capsys.readouterr().out
    data = json.loads((work / "results.json").read_text())
    assert data["settings"]["bytes_width"] == 32
    shape = (3, tiny_study_size(), tiny_study_size())
    base = load_finetuned(load_task_config(cfg), ckpt)
    sites = find_relu_sites(base, shape)
    assert data["baseline"]["bytes"] == plain_bytes({}, sites, 32)
    count, by_bytes = data["specs"]["knapsack@4x4"], data["specs"]["knapsack_bytes@4x4"]
    for entry in (count, by_bytes):
        assert entry["bytes"] == plain_bytes(load_spec(work / entry["file"]), sites, 32)
    assert by_bytes["byte_budget"] == count["bytes"] >= by_bytes["bytes"]
    for run in data["runs"].values():
        model = load_finetuned(load_task_config(cfg), work / run["checkpoint"])
        assert run["bytes"] == plain_bytes(extract_block_spec(model, shape), sites, 32)
        assert run["bytes"] == data["specs"][f"{run['method']}@4x4"]["bytes"]
    table = (work / "results.md").read_text()
    assert "bytes/img (ℓ=32)" in table and f"{by_bytes['bytes']:,}" in table
    assert (work / "accuracy_vs_bytes.png").stat().st_size > 5000
    assert (work / "accuracy_vs_drelus.png").stat().st_size > 5000


def tiny_study_size() -> int:
    from helpers import tiny_study
    return tiny_study.SIZE


def test_help_documents_the_byte_width(capsys):
    from secure_inference.cli import compare_methods
    with pytest.raises(SystemExit):
        compare_methods.main(["--help"])
    text = capsys.readouterr().out
    assert "--bytes-width" in text and "knapsack_bytes" in text and "accuracy_vs_bytes" in text
