"""The demo's pieces: the digits data set on disk, the evaluation subset, table and plots."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from secure_inference.demo import (DemoRow, format_table, plot_results, secure_subset,
                                   write_digits_dataset)


def test_digits_dataset_is_complete_stratified_and_reused(tmp_path):
    from sklearn.datasets import load_digits
    counts = write_digits_dataset(tmp_path, size=16)
    assert sum(counts.values()) == len(load_digits().target) == 1797
    for split in ("train", "val", "test"):
        per_class = [len(list((tmp_path / split / str(d)).glob("*.png"))) for d in range(10)]
        assert sum(per_class) == counts[split]
        assert min(per_class) > 0
    assert counts["test"] == pytest.approx(0.15 * 1797, abs=10)
    img = np.asarray(Image.open(next((tmp_path / "test" / "3").glob("*.png"))))
    assert img.shape == (16, 16) and img.dtype == np.uint8 and img.max() > 100
    names = {split: {p.name for p in (tmp_path / split).rglob("*.png")} for split in counts}
    assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])
    stamp = (tmp_path / "dataset.json").stat().st_mtime_ns
    assert write_digits_dataset(tmp_path, size=16) == counts
    assert (tmp_path / "dataset.json").stat().st_mtime_ns == stamp  # not rewritten
    assert json.loads((tmp_path / "dataset.json").read_text())["source"].startswith("sklearn")


def test_secure_subset_spreads_over_the_test_set():
    pick = secure_subset(269, 60)
    assert len(pick) == 60 and pick[0] == 0 and pick[-1] == 268
    assert torch.all(pick[1:] > pick[:-1])
    assert secure_subset(5, 60).tolist() == [0, 1, 2, 3, 4]


def test_table_and_plots(tmp_path):
    sites = {"a": 100, "b": 50}
    rows = [DemoRow("all ReLUs", 150, 0.97, 60, 0.95, 0.95, 1.0, 0.001, 14e6, 1.2, 103, sites,
                    bytes_per_image_64bit=31e6, drelu_widths=[19, 23]),
            DemoRow("5%", 8, 0.92, 60, 0.9, 0.9, 1.0, 0.01, 2e6, 0.4, 103, {"a": 5, "b": 3})]
    table = format_table(rows)
    assert "secure@60" in table and "14.00" in table and "92.0%" in table
    assert "31.00" in table and "19-23" in table
    paths = plot_results(tmp_path, rows)
    assert [p.name for p in paths] == ["accuracy_vs_drelus.png", "drelus_per_site.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_uniform_spec_of_the_demo_config(tmp_path):
    from secure_inference.demo import write_uniform_spec
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import build_task_model
    from secure_inference.sites import find_relu_sites
    from secure_inference.spec import load_spec
    config = "configs/demo/digits_resnet18.py"
    path = tmp_path / "uniform.pickle"
    count = write_uniform_spec(config, (4, 4), path)
    sites = find_relu_sites(build_task_model(load_task_config(config)), (3, 16, 16))
    assert count == sum(-(-s.height // 4) * -(-s.width // 4) * s.channels for s in sites)
    spec = load_spec(path)
    assert set(spec) == {s.name for s in sites}
    for s in sites:
        assert (spec[s.name] == [min(4, s.height), min(4, s.width)]).all()


def test_table_and_plot_with_a_uniform_row(tmp_path):
    sites = {"a": 100, "b": 50}
    rows = [DemoRow("all ReLUs", 150, 0.97, site_drelus=sites),
            DemoRow("uniform 4x4", 20, 0.90, site_drelus={"a": 10, "b": 10}),
            DemoRow("knap@4x4", 20, 0.93, site_drelus={"a": 5, "b": 15})]
    table = format_table(rows)
    assert "uniform 4x4" in table and "knap@4x4" in table and "exactly the uniform" in table
    paths = plot_results(tmp_path, rows)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_score_secure_run_fills_the_secure_columns():
    from torch import nn

    from secure_inference.demo import score_secure_run
    from secure_inference.mpc.calibrate import calibrate
    from secure_inference.mpc.local import run_local
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        plain = model(x)
    truth = plain.argmax(1)
    truth[0] = (truth[0] + 1) % 3                       # one wrong label: accuracy 3/4
    result = run_local(model, x, calibrate(model, torch.randn(8, 1, 6, 6)), in_process=True)
    row = DemoRow("cal", 256, 0.0)
    secure = score_secure_run(row, result, plain, truth)
    assert row.secure_images == 4 and row.secure_accuracy == row.plaintext_accuracy_secure_images
    assert row.plaintext_accuracy_secure_images == 0.75 and row.agreement == 1.0
    assert row.max_abs_logit_error == float((secure - plain).abs().max()) < 1e-2
    assert row.bytes_per_image_64bit > row.bytes_per_image > 0
    assert row.drelu_widths[1] < 64 and row.rounds == result.report["online"]["rounds"]
