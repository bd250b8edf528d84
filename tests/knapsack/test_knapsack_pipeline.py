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

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=10,
                           mean=[125.0, 123.0, 114.0], std=[63.0, 62.0, 67.0], to_rgb=False),
    backbone=dict(type='ResNet_CIFAR', depth=18, num_stages=4, out_indices=(3,),
                  stem_channels=8, base_channels=8, style='pytorch', init_cfg=None),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=64,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
secure_inference = dict(
    input_shape=[3, 16, 16],
    distortion_data=dict(type='CustomDataset', data_prefix='{data}', with_label=False,
                         pipeline=test_pipeline))
"""


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
