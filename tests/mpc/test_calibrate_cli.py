"""si-calibrate end to end: a calibrated spec that the library reads back with the widths the
table prints, and the headroom refusal as one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import secure_inference as si
from secure_inference.mpc.compile import compile_model
from secure_inference.widths import comparison_width

pytestmark = pytest.mark.processes  # every test here starts Python processes

ROOT = Path(__file__).resolve().parents[2]
MODEL = "helpers.nets:factory"


def _calibrate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "research" / "calibrate.py"), "--model",
                           MODEL, "--input-shape", "3", "16", "16", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests")))


def _model_files(tmp_path):
    """The test model saved as ``w.pth`` and six images as ``x.npy``; returns the model."""
    from tests.helpers.nets import factory
    model = factory().eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    np.save(tmp_path / "x.npy", torch.randn(6, 3, 16, 16).numpy())
    return model


def test_calibrated_spec_and_its_table(tmp_path):
    model = _model_files(tmp_path)
    proc = _calibrate("--checkpoint", tmp_path / "w.pth", "--images", tmp_path / "x.npy",
                      "--out", tmp_path / "cal.json", "--table", tmp_path / "t.json",
                      "--plot", tmp_path / "w.png", "--margin", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = si.load_spec(tmp_path / "cal.json")
    cal = spec.calibration
    assert cal.images == 6 and cal.margin == 4.0 and cal.ranges
    table = json.loads((tmp_path / "t.json").read_text())
    program, _ = compile_model(model, (1, 3, 16, 16), spec=spec)
    widths = program.widths()
    for row in table["layers"]:
        assert row["width"] == widths[row["layer"]] == comparison_width(
            cal.ranges[row["layer"]], 16, 4.0)
        assert row["layer"] in proc.stdout
    assert (tmp_path / "w.png").stat().st_size > 1000


def test_headroom_refusal_is_one_line(tmp_path):
    from tests.helpers.nets import factory
    model = factory().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e4)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    np.save(tmp_path / "x.npy", torch.randn(2, 3, 16, 16).numpy())
    proc = _calibrate("--checkpoint", tmp_path / "w.pth", "--images", tmp_path / "x.npy",
                      "--out", tmp_path / "cal.pickle")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "fixed-point headroom too small" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cal.pickle").exists()


def test_drop_budget_writes_the_dropped_bits_the_program_uses(tmp_path):
    from secure_inference.mpc.ops import DROP_ATTR
    model = _model_files(tmp_path)
    proc = _calibrate("--checkpoint", tmp_path / "w.pth", "--images", tmp_path / "x.npy",
                      "--out", tmp_path / "cal.pickle", "--table", tmp_path / "t.json",
                      "--drop-budget", "0.05")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cal = si.load_spec(tmp_path / "cal.pickle").calibration
    assert cal.drop_budget == 0.05 and cal.drops
    program, _ = compile_model(model, (1, 3, 16, 16), calibration=cal)
    drops = {ly.name: ly.attrs.get(DROP_ATTR, 0) for ly in program.layers}
    table = json.loads((tmp_path / "t.json").read_text())
    assert any(row["dropped_bits"] for row in table["layers"])
    for row in table["layers"]:
        assert row["dropped_bits"] == drops[row["layer"]]
    bad = _calibrate("--images", tmp_path / "x.npy", "--out", tmp_path / "c2.json",
                     "--drop-budget", "1.5")
    assert bad.returncode == 1 and "--drop-budget must be a fraction" in bad.stderr
