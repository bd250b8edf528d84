"""research/extract_block_sizes.py end to end on a tiny mmpretrain config with generated images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_inference.distortion import load_results
from helpers.scripts import load_script
from tiny_configs import TINY_CLS_CONFIG, write_tiny_cls_setup

pytestmark = pytest.mark.processes  # every test here starts Python processes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "research" / "extract_block_sizes.py"

CONFIG = TINY_CLS_CONFIG


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg, ckpt, data = write_tiny_cls_setup(tmp, 8, bn_stats=True)
    return tmp, cfg, ckpt, data


CLI = load_script("research/extract_block_sizes.py", "extract_block_sizes_cli")


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def run(capsys):
    """Run the CLI's main() in this process (the torchrun test runs it as a script)."""
    def _run(*args):
        capsys.readouterr()
        code = CLI.main([str(a) for a in args] + ["--no-progress"])
        return _Result(code, capsys.readouterr().err)
    return _run


SITES = ["backbone.layer1.0.relu#0", "backbone.layer1.0.relu#1", "backbone.layer4.1.relu#1"]


def test_cli_end_to_end_on_mmpretrain_config(setup, run):
    tmp, cfg, ckpt, _ = setup
    out = tmp / "out"
    r = run("--config", cfg, "--checkpoint", ckpt, "--output_path", out, "--num_samples", 5,
             "--batch_size", 3, "--max-rect", 2, "--max-block-size", 4, "--seed", 11,
             "--sites", *SITES)
    assert r.returncode == 0, r.stderr[-3000:]
    meta, res = load_results(out)
    assert meta["sites"] == SITES and meta["input_shape"] == [3, 16, 16]
    assert meta["num_samples"] == 5 and meta["seed"] == 11 and meta["method"] == "exact"
    assert str(cfg.resolve()) in meta["model"]
    # the same numbers from the library on the same (preprocessed, seeded) samples
    from secure_inference.distortion import extract
    from secure_inference.distortion.data import config_samples
    from secure_inference.models import load_config, load_model
    model = load_model(str(cfg), str(ckpt))
    samples = config_samples(load_config(cfg), model, 5, 11, (3, 16, 16))
    assert samples.shape == (5, 3, 16, 16)
    assert abs(float(samples.mean())) < 1.0  # normalised by the data_preprocessor
    lib = extract(model, samples, sites=SITES, max_rect=2, max_block_size=4)
    for name in SITES:
        np.testing.assert_allclose(res[name].distortion, lib[name].distortion, rtol=1e-4,
                                   atol=1e-10)
        assert res[name].distortion[:, -1].max() > 0
    # rerun: complete results are kept, not recomputed
    r = run("--config", cfg, "--checkpoint", ckpt, "--output_path", out, "--num_samples", 5,
             "--batch_size", 3, "--max-rect", 2, "--max-block-size", 4, "--seed", 11,
             "--sites", *SITES)
    assert r.returncode == 0 and "already holds the complete results" in r.stderr
    # a different sample count in the same folder is refused, naming the difference
    r = run("--config", cfg, "--checkpoint", ckpt, "--output_path", out, "--num_samples", 4,
             "--batch_size", 3, "--max-rect", 2, "--max-block-size", 4, "--seed", 11,
             "--sites", *SITES)
    assert r.returncode == 2 and "num_samples" in r.stderr and "different run" in r.stderr


def test_cli_bad_inputs(setup, tmp_path, run):
    tmp, cfg, ckpt, data = setup
    r = run("--config", cfg, "--checkpoint", tmp / "missing.pth", "--output_path",
             tmp_path / "a", "--num_samples", 2)
    assert r.returncode == 2 and "checkpoint file not found" in r.stderr
    nodata = tmp_path / "nodata.py"
    nodata.write_text(CONFIG.replace("{data}", str(data)).split("secure_inference =")[0]
                      + "secure_inference = dict(input_shape=[3, 16, 16])\n")
    r = run("--config", nodata, "--output_path", tmp_path / "b", "--num_samples", 2)
    assert r.returncode == 2 and "distortion_data" in r.stderr
    r = run("--config", cfg, "--checkpoint", ckpt, "--output_path", tmp_path / "c",
             "--num_samples", 2, "--sites", "backbone.nope")
    assert r.returncode == 2 and "unknown site" in r.stderr
    r = run("--config", cfg, "--checkpoint", ckpt, "--output_path", tmp_path / "d",
             "--num_samples", 50)
    assert r.returncode == 2 and "only 8 images" in r.stderr
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abcd")
