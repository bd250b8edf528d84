"""Real pipeline (slow): distortion CLI on a tiny mmpretrain model -> knapsack CLI with --config
-> spec that the finetune-ready model accepts within budget. The fast tests in
test_knapsack_cli.py cover the knapsack side on generated distortion folders."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import secure_inference as si
from tiny_configs import TINY_CLS_CONFIG

ROOT = Path(__file__).resolve().parents[2]

CONFIG = TINY_CLS_CONFIG


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "research" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_distortion_to_spec_pipeline(tmp_path):
    from PIL import Image
    from secure_inference.models import load_model
    data = tmp_path / "train"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = tmp_path / "tiny.py"
    cfg.write_text(CONFIG.replace("{data}", str(data)))
    model = load_model(str(cfg))
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)
    dist = tmp_path / "dist"
    assert load_script("extract_block_sizes").main(
        ["--config", str(cfg), "--checkpoint", str(ckpt), "--output_path", str(dist),
         "--num_samples", "2", "--batch_size", "2", "--max-rect", "2", "--max-block-size", "4",
         "--no-progress"]) == 0
    out = tmp_path / "spec.pickle"
    assert load_script("knapsack_patch_size_extractor").main(
        ["--config", str(cfg), "--channel_distortion_path", str(dist), "--ratio", "0.05",
         "--block_size_spec_file_name", str(out), "--no_plot"]) == 0
    model = load_model(str(cfg), str(ckpt))
    sites = si.find_relu_sites(model, (3, 16, 16))
    spec = si.load_spec(out)
    assert si.count_drelus(spec, sites)["total"] <= int(0.05 * sum(s.num_relus for s in sites))
    si.apply_block_spec(model, spec, (3, 16, 16))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 16, 16), mode="tensor")).all()
