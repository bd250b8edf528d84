"""research/compare_methods.py end to end on a tiny classification task: outputs, budgets,
resumption (nothing redone; a deleted run redone alone)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from secure_inference.mmlab.config_utils import load_task_config
from secure_inference.mmlab.finetune import load_finetuned
from secure_inference.sites import find_relu_sites
from secure_inference.spec import count_drelus, load_spec

from helpers import tiny_study

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "research" / "compare_methods.py"


def _load_cli():
    spec = importlib.util.spec_from_file_location("compare_methods_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLI = _load_cli()  # the research/ path: a shim over secure_inference.cli.compare_methods


@pytest.mark.processes
def test_help_loads_no_torch_and_lists_every_method():
    from secure_inference.cli import compare_methods
    from secure_inference.study.methods import METHODS
    assert compare_methods.METHOD_NAMES == tuple(METHODS)
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--iterative-samples" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"torch", "mmengine", "mmpretrain"}
METHODS = ["knapsack", "uniform", "linearisation"]


def test_help_explains_budgets_methods_seeds_outputs(capsys):
    with pytest.raises(SystemExit) as e:
        CLI.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("Budgets", "7x7", "Methods", "linearisation", "iterative", "Seeds",
                 "results.json", "accuracy_vs_drelus.png", "Resumption"):
        assert word in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_study.write_tiny_study(tmp_path_factory.mktemp("tiny"))


def test_compare_end_to_end_and_resume(tiny, tmp_path, capsys):
    """12 one-epoch finetunes plus two reruns: about 25 s on a 2-core machine (not asserted:
    the machine is shared, and a wall-clock bound would fail under someone else's load)."""
    cfg, ckpt = tiny
    work = tmp_path / "work"
    argv = [str(cfg), str(ckpt), "--work-dir", str(work), "--budgets", "4x4", "2x2",
            "--methods", *METHODS, "--seeds", "0", "1", "--num-samples", "4"]
    assert CLI.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("...") == 12  # one progress line per run start
    assert "ETA" in out

    data = json.loads((work / "results.json").read_text())
    assert len(data["runs"]) == 12 and data["baseline"]["test_images"] == 24
    # no path of this machine in the results: config and checkpoint relative to the work dir
    for key, given in (("config", cfg), ("checkpoint", ckpt)):
        assert not Path(data["settings"][key]).is_absolute()
        assert (work / data["settings"][key]).resolve() == Path(given).resolve()
    model = load_finetuned(load_task_config(cfg), ckpt)
    sites = find_relu_sites(model, (3, 16, 16))
    plain = {b: sum(-(-s.height // b) * -(-s.width // b) * s.channels for s in sites)
             for b in (2, 4)}
    assert data["budgets"]["2x2"]["drelus"] == plain[2]
    assert data["budgets"]["4x4"]["drelus"] == plain[4]
    for key, entry in data["specs"].items():
        spec = load_spec(work / entry["file"])
        drelus = count_drelus(spec, sites)["total"]
        assert drelus == entry["drelus"] <= entry["budget_drelus"]
        if entry["method"] == "uniform":
            assert drelus == entry["budget_drelus"]
        if entry["method"] == "linearisation":
            assert {tuple(r) for a in spec.values() for r in a} <= {(1, 1), (0, 1)}
    for run in data["runs"].values():
        assert run["drelus"] <= run["budget_drelus"]
        assert 0.0 <= run["accuracy"] <= 1.0
        assert (work / run["checkpoint"]).is_file()
    table = (work / "results.md").read_text()
    assert all(m in table for m in METHODS) and "± " in table
    assert (work / "accuracy_vs_drelus.png").stat().st_size > 5000

    # second invocation: nothing to do
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("final.pth")}
    assert CLI.main(argv) == 0
    out = capsys.readouterr().out
    assert "..." not in out and out.count("done already") == 12
    assert {p: p.stat().st_mtime_ns for p in work.rglob("final.pth")} == stamps

    # a deleted run (its record gone, e.g. interrupted) is redone, and only that one
    gone = "knapsack@4x4#seed1"
    data["runs"].pop(gone)
    (work / "results.json").write_text(json.dumps(data))
    assert CLI.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("...") == 1 and gone in out
    again = json.loads((work / "results.json").read_text())
    assert len(again["runs"]) == 12 and gone in again["runs"]
    redone = work / "runs" / "knapsack" / "4x4" / "seed1" / "final.pth"
    assert redone.stat().st_mtime_ns != stamps[redone]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != redone)


def test_bad_arguments_are_reported(tmp_path, capsys):
    cfg, ckpt = tmp_path / "c.py", tmp_path / "c.pth"
    code = CLI.main([str(cfg), str(ckpt), "--work-dir", str(tmp_path / "w"), "--budgets", "4x4",
                     "--max-seeds", "uniform"])
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_distillation_and_iterative_methods_run(tiny, tmp_path, capsys):
    """knapsack_kd trains with the distillation loss; iterative meets its budget."""
    cfg, ckpt = tiny
    work = tmp_path / "work"
    assert CLI.main([str(cfg), str(ckpt), "--work-dir", str(work), "--budgets", "4x4",
                     "--methods", "knapsack_kd", "iterative", "--seeds", "0",
                     "--num-samples", "4", "--iterative-rounds", "2",
                     "--cfg-options", "default_hooks.logger.interval=1"]) == 0
    data = json.loads((work / "results.json").read_text())
    assert set(data["runs"]) == {"knapsack_kd@4x4#seed0", "iterative@4x4#seed0"}
    assert set(data["specs"]) == {"knapsack@4x4", "iterative@4x4"}  # kd reuses the knapsack spec
    it = data["specs"]["iterative@4x4"]
    assert it["drelus"] <= it["budget_drelus"] and len(it["rounds"]) == 2
    logged = [json.loads(line) for f in (work / "runs" / "knapsack_kd").rglob("scalars.json")
              for line in f.read_text().splitlines()]
    assert logged and all(rec["loss_kd"] > 0 for rec in logged if "loss" in rec)
    plain = [json.loads(line) for f in (work / "runs" / "iterative").rglob("scalars.json")
             for line in f.read_text().splitlines()]
    assert plain and not any("loss_kd" in rec for rec in plain)


@pytest.mark.processes
def test_parallel_jobs_record_the_same_runs_as_one_process(tiny, tmp_path, capsys):
    """--jobs 2: runs finetune in two worker processes while the main process builds the
    specs (cheapest first); every run is recorded once, with the same spec and DReLU count as
    in one process, and a rerun finds nothing to do."""
    cfg, ckpt = tiny
    common = [str(cfg), str(ckpt), "--budgets", "4x4", "--methods", "knapsack", "uniform",
              "--seeds", "0", "1", "--num-samples", "4", "--threads", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert CLI.main([*common, "--work-dir", str(one)]) == 0
    capsys.readouterr()
    assert CLI.main([*common, "--work-dir", str(two), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("queued") == 4
    # uniform needs no distortion, so its runs are queued before the knapsack spec is built
    queued = [line for line in out.splitlines() if "queued" in line or "spec knapsack" in line]
    assert [("uniform" in q) for q in queued[:2]] == [True, True]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert set(a["runs"]) == set(b["runs"]) and len(b["runs"]) == 4
    for key, run in b["runs"].items():
        assert run["drelus"] == a["runs"][key]["drelus"]
        assert (two / run["checkpoint"]).is_file()
    assert {k: v["drelus"] for k, v in a["specs"].items()} == \
        {k: v["drelus"] for k, v in b["specs"].items()}
    assert CLI.main([*common, "--work-dir", str(two), "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("done already") == 4


def test_jobs_below_one_is_refused(tiny, tmp_path, capsys):
    cfg, ckpt = tiny
    code = CLI.main([str(cfg), str(ckpt), "--work-dir", str(tmp_path / "w"), "--budgets", "4x4",
                     "--methods", "uniform", "--jobs", "0"])
    assert code == 2 and "jobs" in capsys.readouterr().err
