"""End-to-end finetuning on CPU: dist_train.sh (2 gloo processes) with a Block-ReLU spec.

For a classification config (ResNet18-CIFAR, Block-ReLUs also at the twice-called BasicBlock
ReLUs) and a segmentation config (DeepLabV3-MobileNetV2 with ReLU6→ReLU), scaled down to
tiny generated data sets: train 2 iterations, evaluate, checkpoint (spec recorded), resume,
and reproduce the training-time metric with test.py / dist_test.sh.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import secure_inference  # noqa: F401  (compat fixes)
from secure_inference import save_spec
from secure_inference.mmlab.config_utils import load_task_config
from secure_inference.mmlab.finetune import (SpecMismatchError, build_task_model,
                                             checkpoint_meta, checkpoint_spec, prepare_model)
from secure_inference.mmlab.runner import prepare_test, prepare_training
from secure_inference.sites import find_relu_sites

from helpers import tiny_tasks as tt
from helpers.scripts import load_script

pytestmark = pytest.mark.processes  # every test here starts Python processes

REPO = tt.REPO
TOOLS = REPO / "mmlab_tools"
SIZES = [[2, 2], [1, 1], [0, 1], [4, 4], [1, 3], [3, 2]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(TOOLS / script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        noise = ("Warning", "warnings.warn", "_bootstrap._exec", "import pkg_resources")
        lines = [ln for ln in out.splitlines() if not any(n in ln for n in noise)]
        raise AssertionError(f"{script} failed (rc={proc.returncode}):\n"
                             + "\n".join(lines)[-8000:])
    return out


def make_spec(config: Path, path: Path) -> dict[str, np.ndarray]:
    """Block-ReLUs at every other site, with mixed sizes (identity and ReLU rows included)."""
    cfg = load_task_config(config)
    model = prepare_model(build_task_model(cfg), cfg, None)
    sites = find_relu_sites(model, cfg.secure_inference.input_shape)
    spec = {}
    for j, site in enumerate(sites[::2]):
        spec[site.name] = np.array([SIZES[(c + j) % len(SIZES)] for c in range(site.channels)],
                                   dtype=np.int32)
    save_spec(spec, path)
    return spec


def val_metrics(work_dir: Path) -> list[dict]:
    """Validation records of every run in ``work_dir`` (from mmengine's scalars.json)."""
    records = []
    for f in sorted(work_dir.glob("*/vis_data/scalars.json")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "loss" not in rec and "lr" not in rec:
                records.append(rec)
    return records


def specs_equal(a, b) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def load_tool(name: str):
    return load_script(f"mmlab_tools/{name}.py", f"mmlab_tools_{name}")


# --------------------------------------------------------------------------- classification

@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    data = tt.make_cls_data(root / "data")
    config = tt.cls_config(root / "tiny_cls.py", data, max_epochs=1)
    spec_file = root / "spec.pickle"
    spec = make_spec(config, spec_file)
    # a plain (all-ReLU) baseline checkpoint to finetune from
    import torch
    baseline = build_task_model(load_task_config(config))
    torch.save({"state_dict": baseline.state_dict(), "meta": {}}, root / "baseline.pth")
    work = root / "work"
    log = run_script("dist_train.sh", config, 2, "--work-dir", work,
                     "--relu-spec-file", spec_file, "--load-from", root / "baseline.pth")
    return dict(root=root, config=config, spec=spec, spec_file=spec_file, work=work, log=log,
                baseline=root / "baseline.pth")


def test_cls_trains_evaluates_and_records_spec(cls_run):
    ckpt = cls_run["work"] / "epoch_1.pth"
    assert ckpt.is_file()
    meta = checkpoint_meta(ckpt)
    assert meta["iter"] == 2 and meta["epoch"] == 1       # 6 images, 2 processes x 2 per batch
    assert specs_equal(checkpoint_spec(ckpt), cls_run["spec"])
    entry = meta["secure_inference"]
    n = tt.CLS_SIZE
    assert entry["conversions"] == [] and entry["input_shape"] == [3, n, n]
    assert 0 < entry["drelus"] < n * n * 3904            # fewer DReLUs than the all-ReLU net
    vals = val_metrics(cls_run["work"])
    assert len(vals) == 1 and "accuracy/top1" in vals[0]


def test_cls_finetune_starts_from_load_from(cls_run):
    """The baseline weights loaded into the Block-ReLU model (two small SGD steps away)."""
    from secure_inference.models import read_checkpoint, state_dict_of
    assert f"Load checkpoint from {cls_run['baseline']}" in cls_run["log"]
    base = state_dict_of(read_checkpoint(cls_run["baseline"]))
    tuned = state_dict_of(read_checkpoint(cls_run["work"] / "epoch_1.pth"))
    assert set(base) == set(tuned)                      # Block-ReLUs add no state
    for key in ("backbone.conv1.weight", "backbone.layer4.1.conv2.weight"):
        scale = base[key].abs().max().item()
        # a fresh random init would differ by about the scale itself
        assert 0 < (tuned[key] - base[key]).abs().max().item() < 0.5 * scale


def test_cls_test_py_reproduces_metric(cls_run, tmp_path):
    out = tmp_path / "metrics.json"
    load_tool("test").main([str(cls_run["config"]), str(cls_run["work"] / "epoch_1.pth"),
                            "--work-dir", str(tmp_path / "t"), "--out", str(out)])
    metrics = json.loads(out.read_text())
    train_val = val_metrics(cls_run["work"])[0]
    assert metrics["accuracy/top1"] == pytest.approx(train_val["accuracy/top1"], abs=1e-4)
    # independent recount: the finetuned model (spec from the checkpoint) on the val images
    import torch
    from mmpretrain.registry import DATASETS
    from secure_inference.mmlab.finetune import load_finetuned
    cfg = load_task_config(cls_run["config"])
    model = load_finetuned(cfg, cls_run["work"] / "epoch_1.pth")
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    samples = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        x = model.data_preprocessor({"inputs": [s["inputs"] for s in samples]})["inputs"]
        pred = model(x, mode="tensor").argmax(dim=1)
    labels = torch.tensor([int(s["data_samples"].gt_label) for s in samples])
    accuracy = 100.0 * (pred == labels).float().mean().item()
    assert metrics["accuracy/top1"] == pytest.approx(accuracy, abs=1e-4)


def test_cls_test_refuses_other_spec(cls_run, tmp_path):
    other = {k: np.ones_like(v) for k, v in cls_run["spec"].items()}   # all plain ReLU rows
    with pytest.raises(SpecMismatchError, match="differs"):
        prepare_test(cls_run["config"], cls_run["work"] / "epoch_1.pth", spec=other,
                     work_dir=str(tmp_path))


def test_cls_resume_without_spec_is_refused(cls_run, tmp_path):
    import shutil
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(cls_run["work"] / "epoch_1.pth", work / "epoch_1.pth")
    (work / "last_checkpoint").write_text(str(work / "epoch_1.pth"))
    _, _, runner = prepare_training(cls_run["config"], spec=None, work_dir=str(work),
                                    resume=True, cfg_options={"train_cfg.max_epochs": 2})
    with pytest.raises(SpecMismatchError, match="no spec was given"):
        runner.train()


def test_cls_resume(cls_run):
    log = run_script("dist_train.sh", cls_run["config"], 2, "--work-dir", cls_run["work"],
                     "--relu-spec-file", cls_run["spec_file"], "--resume",
                     "--cfg-options", "train_cfg.max_epochs=2")
    assert "resumed epoch: 1, iter: 2" in log
    ckpt = cls_run["work"] / "epoch_2.pth"
    meta = checkpoint_meta(ckpt)
    assert meta["iter"] == 4 and meta["epoch"] == 2
    assert specs_equal(checkpoint_spec(ckpt), cls_run["spec"])
    assert "Epoch(train) [1]" not in log.split("resumed epoch")[1]   # epoch 1 was not rerun


# --------------------------------------------------------------------------- segmentation

@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    data = tt.make_seg_data(root / "data")
    config = tt.seg_config(root / "tiny_seg.py", data, max_iters=2)
    spec_file = root / "spec.json"
    spec = make_spec(config, spec_file)
    work = root / "work"
    log = run_script("dist_train.sh", config, 2, "--work-dir", work,
                     "--relu-spec-file", spec_file)
    return dict(root=root, config=config, spec=spec, spec_file=spec_file, work=work, log=log)


def test_seg_trains_with_conversion_and_spec(seg_run):
    ckpt = seg_run["work"] / "iter_2.pth"
    meta = checkpoint_meta(ckpt)
    assert meta["iter"] == 2
    assert specs_equal(checkpoint_spec(ckpt), seg_run["spec"])
    assert meta["secure_inference"]["conversions"] == ["relu6_to_relu"]
    vals = val_metrics(seg_run["work"])
    assert len(vals) == 1 and "mIoU" in vals[0]


def test_seg_dist_test_reproduces_metric(seg_run, tmp_path):
    out = tmp_path / "metrics.json"
    run_script("dist_test.sh", seg_run["config"], seg_run["work"] / "iter_2.pth", 2,
               "--work-dir", tmp_path / "t", "--out", out)
    metrics = json.loads(out.read_text())
    train_val = val_metrics(seg_run["work"])[0]
    for key in ("mIoU", "aAcc", "mAcc"):
        assert metrics[key] == pytest.approx(train_val[key], abs=1e-6)


def test_seg_resume(seg_run):
    log = run_script("dist_train.sh", seg_run["config"], 2, "--work-dir", seg_run["work"],
                     "--relu-spec-file", seg_run["spec_file"], "--resume",
                     "--cfg-options", "train_cfg.max_iters=4")
    assert "resumed epoch: 0, iter: 2" in log
    meta = checkpoint_meta(seg_run["work"] / "iter_4.pth")
    assert meta["iter"] == 4
    assert specs_equal(checkpoint_spec(seg_run["work"] / "iter_4.pth"), seg_run["spec"])
