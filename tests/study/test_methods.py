"""The study's method builders, budgets, run plan, results file and report, checked against
plain references on a small torch model."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from secure_inference.sites import find_relu_sites
from secure_inference.spec import count_drelus
from secure_inference.study import (Budget, ResultsFile, RunKey, SpecBuilder, parse_budget,
                                    plan_runs, resolve_budgets, restrict_candidates,
                                    uniform_spec)
from secure_inference.study.methods import METHODS, round_budgets
from secure_inference.study.report import aggregate, format_table, gaps, plot
from secure_inference.study.runs import spec_method

SHAPE = (3, 10, 10)


def small_net() -> nn.Module:
    """Three ReLU sites: 3 channels at 10x10, 2 at 5x5, 2 at 3x3 (odd sizes: partial patches)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(18, 4)).eval()


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    torch.manual_seed(1)
    samples = torch.randn(6, *SHAPE)
    return SpecBuilder(small_net(), samples, tmp_path_factory.mktemp("dist"), model_id="small",
                       iterative_rounds=3)


def plain_uniform_count(sites, h, w) -> int:
    return sum(math.ceil(s.height / h) * math.ceil(s.width / w) * s.channels for s in sites)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (4, 4), (7, 7), (2, 3), (12, 12)])
def test_uniform_spec_count_is_the_plain_formula(size):
    sites = find_relu_sites(small_net(), SHAPE)
    spec = uniform_spec(sites, size)
    assert count_drelus(spec, sites)["total"] == plain_uniform_count(sites, *size)
    assert all(np.all(spec[s.name] == [min(size[0], s.height), min(size[1], s.width)])
               for s in sites)


def test_budget_tokens_and_resolution():
    sites = find_relu_sites(small_net(), SHAPE)
    total = sum(s.channels * s.height * s.width for s in sites)
    assert parse_budget("4x4") == ("size", (4, 4))
    assert parse_budget("0.25") == ("ratio", 0.25)
    assert parse_budget("40") == ("count", 40)
    for bad in ("4x", "0", "-3", "1.5", "abc", "0x2"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    b = resolve_budgets(["2x2", "0.25", "40"], sites)
    assert [x.drelus for x in b] == [plain_uniform_count(sites, 2, 2), int(0.25 * total), 40]
    assert b[0].uniform_size == (2, 2) and b[1].uniform_size is None
    with pytest.raises(ValueError, match="duplicate"):
        resolve_budgets(["2x2", "2x2"], sites)
    with pytest.raises(ValueError, match="more DReLUs"):
        resolve_budgets([str(total + 1)], sites)


def test_round_budgets_fall_to_the_target():
    assert round_budgets(1000, 10, 1) == [10]
    r = round_budgets(1000, 10, 3)
    assert r == [215, 46, 10]
    assert all(a >= b for a, b in zip(r, r[1:]))
    with pytest.raises(ValueError):
        round_budgets(1000, 10, 0)


def brute_force(results, budget):
    """Minimum summed distortion over every combination of one candidate per channel."""
    options = [list(zip(r.costs, r.distortion[c])) for r in results.values()
               for c in range(r.channels)]
    best = math.inf
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) <= budget:
            best = min(best, sum(d for _, d in combo))
    return best


def spec_distortion(results, spec):
    total = 0.0
    for name, r in results.items():
        for c, hw in enumerate(spec[name]):
            k = [tuple(b) for b in r.block_sizes].index(tuple(hw))
            total += r.distortion[c, k]
    return total


def test_linearisation_uses_only_relu_and_identity_and_is_optimal(builder):
    sites = builder.sites
    budget = Budget("0.3", int(0.3 * sum(s.num_relus for s in sites)), None)
    built = builder.build("linearisation", budget)
    rows = {tuple(r) for arr in built.spec.values() for r in arr}
    assert rows <= {(1, 1), (0, 1)} and rows == {(1, 1), (0, 1)}
    assert built.drelus <= budget.drelus
    assert built.drelus == sum(s.height * s.width * int((built.spec[s.name] == [1, 1])
                                                        .all(1).sum()) for s in sites)
    restricted = restrict_candidates(builder.distortion("exact"))
    assert all(len(r.block_sizes) == 2 for r in restricted.values())
    # 7 channels, 2 options each: the brute force over all 128 choices
    assert spec_distortion(restricted, built.spec) == pytest.approx(
        brute_force(restricted, budget.drelus), rel=1e-9)


def test_knapsack_meets_budget_and_beats_uniform_on_its_own_proxy(builder):
    sites = builder.sites
    for size in [(2, 2), (3, 3)]:
        budget = resolve_budgets([f"{size[0]}x{size[1]}"], sites)[0]
        uni = builder.build("uniform", budget)
        assert uni.drelus == budget.drelus == plain_uniform_count(sites, *size)
        for method in ("knapsack", "knapsack_linear"):
            built = builder.build(method, budget)
            assert built.drelus <= budget.drelus
            results = builder.distortion(METHODS[method].distortion)
            # the uniform spec is one feasible choice of the knapsack: never better
            assert spec_distortion(results, built.spec) <= spec_distortion(results,
                                                                           uni.spec) + 1e-12
    with pytest.raises(ValueError, match="patch-size budget"):
        builder.build("uniform", Budget("0.1", 10, None))


def test_iterative_remeasures_with_the_spec_applied(builder):
    budget = resolve_budgets(["3x3"], builder.sites)[0]
    built = builder.build("iterative", budget)
    assert built.drelus <= budget.drelus
    rounds = built.details["rounds"]
    assert len(rounds) == 3 and rounds[-1]["budget"] == budget.drelus
    assert rounds[0]["budget"] > rounds[1]["budget"] > rounds[2]["budget"]
    folders = sorted(p.name for p in builder.cache_dir.iterdir())
    assert sum(name.startswith("exact_with_spec_") for name in folders) >= 2
    # measured on the reduced network: a channel kept at its current size changes nothing
    first = builder.build("knapsack", Budget(
        "r1", rounds[0]["budget"], None)).spec
    again = builder.distortion("exact", first)
    for name, r in again.items():
        keys = [tuple(b) for b in r.block_sizes]
        for c, hw in enumerate(first[name]):
            assert r.distortion[c, keys.index(tuple(hw))] == 0.0
        assert r.distortion.max() > 0


def test_iterative_remeasures_on_fewer_samples(tmp_path):
    torch.manual_seed(1)
    b = SpecBuilder(small_net(), torch.randn(6, *SHAPE), tmp_path, model_id="small",
                    iterative_rounds=2, remeasure_samples=3)
    built = b.build("iterative", resolve_budgets(["3x3"], b.sites)[0])
    metas = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/meta.json")}
    assert metas["exact"]["num_samples"] == 6
    again = [m for name, m in metas.items() if name.startswith("exact_with_spec_")]
    assert len(again) == 1 and again[0]["num_samples"] == 3
    assert built.drelus <= resolve_budgets(["3x3"], b.sites)[0].drelus
    with pytest.raises(ValueError, match="remeasure_samples"):
        SpecBuilder(small_net(), torch.randn(6, *SHAPE), tmp_path, model_id="x",
                    remeasure_samples=7)


def test_kd_method_finetunes_the_knapsack_spec_with_distillation(monkeypatch, tmp_path):
    from secure_inference.study import runs
    assert spec_method("knapsack_kd") == "knapsack" and METHODS["knapsack_kd"].distill
    assert not any(METHODS[m].distill for m in METHODS if m != "knapsack_kd")
    seen = {}

    class FakeRunner:
        def train(self):
            pass

        def save_checkpoint(self, out_dir, filename, **kw):
            seen["saved"] = (out_dir, filename)

    def fake_prepare(config, **kwargs):
        seen.update(kwargs)
        return None, None, FakeRunner()

    import secure_inference.mmlab.runner as runner_mod
    monkeypatch.setattr(runner_mod, "prepare_training", fake_prepare)
    runs.finetune("cfg.py", "base.pth", {}, tmp_path, 3,
                  distill=dict(temperature=2.0, loss_weight=0.5))
    assert seen["cfg_options"]["secure_inference.distill"] == dict(
        enabled=True, teacher_checkpoint="base.pth", temperature=2.0, loss_weight=0.5)
    assert seen["cfg_options"]["randomness"]["seed"] == 3 and seen["load_from"] == "base.pth"
    runs.finetune("cfg.py", "base.pth", {}, tmp_path, 4)
    assert "secure_inference.distill" not in seen["cfg_options"]


def test_plan_runs_limits_seeds_and_skips_uniform_off_size_budgets():
    budgets = [Budget("4x4", 10, (4, 4)), Budget("2x2", 40, (2, 2)), Budget("0.5", 20, None)]
    runs = plan_runs(["knapsack", "uniform", "iterative"], budgets, [0, 1], {"iterative": 1})
    ids = [r.id for r in runs]
    assert len(ids) == len(set(ids)) == 2 * 3 + 2 * 2 + 3
    assert "uniform@0.5#seed0" not in ids and "iterative@4x4#seed1" not in ids
    assert ids[0] == "knapsack@2x2#seed0"            # seed 0 first, largest budget first
    assert all(r.seed == 0 for r in runs[:7])
    with pytest.raises(ValueError):
        plan_runs(["knapsack"], budgets, [0], {"uniform": 1})


def test_results_file_records_atomically_and_refuses_other_settings(tmp_path):
    path = tmp_path / "results.json"
    res = ResultsFile(path)
    res.check_settings({"a": 1})
    key = RunKey("knapsack", "4x4", 0)
    res.record(key, {"accuracy": 0.5, "drelus": 3})
    again = ResultsFile(path)
    assert again.done(key) and not again.done(RunKey("knapsack", "4x4", 1))
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp files left
    with pytest.raises(ValueError, match="other settings"):
        again.check_settings({"a": 2})
    again.forget(key)
    assert not ResultsFile(path).done(key)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        ResultsFile(path)


def test_report_mean_std_gaps_and_plot(tmp_path):
    accs = {"knapsack": [0.90, 0.92, 0.91], "uniform": [0.85, 0.86, 0.84], "iterative": [0.89]}
    runs = {}
    for m, values in accs.items():
        for s, a in enumerate(values):
            runs[f"{m}@4x4#seed{s}"] = dict(method=m, budget="4x4", seed=s, accuracy=a,
                                            drelus=100 if m == "uniform" else 98,
                                            budget_drelus=100)
    data = {"runs": runs, "budgets": {"4x4": {"drelus": 100}},
            "baseline": {"accuracy": 0.93, "drelus": 1000, "test_images": 10}}
    rows = {r["method"]: r for r in aggregate(data)}
    assert rows["knapsack"]["mean"] == pytest.approx(np.mean(accs["knapsack"]))
    assert rows["knapsack"]["std"] == pytest.approx(np.std(accs["knapsack"], ddof=1))
    assert rows["iterative"]["std"] == 0.0 and rows["uniform"]["share"] == 0.1
    g = {x["method"]: x for x in gaps(list(rows.values()))}
    assert g["uniform"]["gap"] == pytest.approx(0.91 - 0.85) and g["uniform"]["exceeds"]
    assert g["iterative"]["exceeds"] is None
    table = format_table(data)
    assert "91.00 ± 1.00" in table and "| 4x4 | uniform | +6.00 |" in table
    png = plot(data, tmp_path / "p.png")
    assert png.stat().st_size > 5000
    json.dumps(aggregate(data))  # plain values
