"""Real pipeline (slow): distortion CLI on a tiny mmpretrain model -> knapsack CLI with --config
-> spec that the finetune-ready model accepts within budget. The fast tests in
test_knapsack_cli.py cover the knapsack side on generated distortion folders."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import secure_inference as si
from tiny_configs import write_tiny_cls_setup

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "research" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_distortion_to_spec_pipeline(tmp_path):
    from secure_inference.models import load_model
    cfg, ckpt, _ = write_tiny_cls_setup(tmp_path, 4)
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
