"""The client's inputs and scores (secure_inference.evaluation) against plain references:
top-1 counted by hand, mIoU by a per-class loop over small label maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from secure_inference.evaluation import (InputDataError, load_image_array, load_image_folder,
                                         load_labels, score, segmentation_scores, top1_accuracy)


def test_top1_against_a_hand_count():
    logits = torch.tensor([[0.1, 0.9, 0.0],     # predicts 1
                           [2.0, 1.0, 0.5],     # predicts 0
                           [0.0, 0.1, 0.2],     # predicts 2
                           [1.0, 3.0, 2.0]])    # predicts 1
    labels = np.array([1, 2, 2, 0])             # right: images 0 and 2
    assert top1_accuracy(logits, labels) == 0.5
    assert score(logits, labels) == {"top1_accuracy": 0.5}


def naive_miou(pred: np.ndarray, labels: np.ndarray, k: int, ignore: int = 255):
    ious, hits, counted = [], 0, 0
    for c in range(k):
        inter = union = 0
        for p, t in zip(pred.ravel(), labels.ravel()):
            if t == ignore:
                continue
            inter += int(p == c and t == c)
            union += int(p == c or t == c)
        if union:
            ious.append(inter / union)
    for p, t in zip(pred.ravel(), labels.ravel()):
        if t != ignore:
            counted += 1
            hits += int(p == t)
    return (sum(ious) / len(ious) if ious else math.nan), hits / max(counted, 1)


@pytest.mark.parametrize("seed", range(4))
def test_miou_against_a_per_class_loop(seed):
    rng = np.random.default_rng(seed)
    n, k, h, w = 2, 4, 6, 5
    logits = torch.from_numpy(rng.normal(size=(n, k, h, w)))    # label size: no resizing
    labels = rng.integers(0, k, size=(n, h, w))
    labels[rng.random((n, h, w)) < 0.2] = 255
    got = segmentation_scores(logits, labels)
    miou, acc = naive_miou(logits.argmax(1).numpy(), labels, k)
    assert got["mIoU"] == pytest.approx(miou) and got["pixel_accuracy"] == pytest.approx(acc)
    assert score(logits, labels) == got


def test_miou_resizes_logits_to_the_labels_and_ignores_absent_classes():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, :, 0] = 1.0     # left half: class 1, right half: class 0
    labels = np.array([[[1, 1, 0, 0]] * 4])           # 4 x 4 maps
    got = segmentation_scores(logits, labels)
    up = torch.nn.functional.interpolate(logits, size=(4, 4), mode="bilinear",
                                         align_corners=False).argmax(1).numpy()
    miou, acc = naive_miou(up, labels, 3)
    assert got["mIoU"] == pytest.approx(miou) and got["pixel_accuracy"] == pytest.approx(acc)
    only_ignored = segmentation_scores(logits, np.full((1, 4, 4), 255))
    assert math.isnan(only_ignored["mIoU"]) and only_ignored["pixel_accuracy"] == 0.0


def test_load_labels_checks_before_anything_runs(tmp_path):
    path = tmp_path / "y.npy"
    np.save(path, np.array([0, 2, 1]))
    assert load_labels(path, 3, (3, 3)).tolist() == [0, 2, 1]
    for labels, n, shape, message in [
            (np.array([0, 1]), 3, (3, 3), "expected class indices"),
            (np.array([0.0, 1.0, 2.0]), 3, (3, 3), "integer class indices"),
            (np.array([0, 1, 3]), 3, (3, 3), r"outside \[0, 3\)"),
            (np.zeros((2, 4, 4), np.int64), 2, (2, 3, 2, 2), None),
            (np.full((2, 4, 4), 255), 2, (2, 3, 2, 2), None),
            (np.full((2, 4, 4), 7), 2, (2, 3, 2, 2), "outside"),
            (np.zeros(2, np.int64), 2, (2, 3, 2, 2), "segmentation maps")]:
        np.save(path, labels)
        if message is None:
            assert load_labels(path, n, shape).shape == labels.shape
        else:
            with pytest.raises(InputDataError, match=message):
                load_labels(path, n, shape)
    with pytest.raises(InputDataError, match="no such file"):
        load_labels(tmp_path / "missing.npy", 3, (3, 3))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InputDataError, match="not a readable"):
        load_labels(tmp_path / "bad.npy", 3, (3, 3))


def test_image_array_and_folder(tmp_path):
    from PIL import Image
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert torch.equal(load_image_array(tmp_path / "x.npy", (3, 4, 5)), torch.from_numpy(x))
    with pytest.raises(InputDataError, match=r"expected an array \[N, 3, 5, 4\]"):
        load_image_array(tmp_path / "x.npy", (3, 5, 4))
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    pixels = np.array([[[10, 20, 30]] * 5] * 4, np.uint8)       # 4 x 5 RGB, one colour
    Image.fromarray(pixels).save(folder / "b.png")
    Image.fromarray(pixels).save(folder / "sub" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    got = load_image_folder(folder, (3, 4, 5), [10.0, 0.0, 30.0], [1.0, 2.0, 10.0])
    assert got.shape == (2, 3, 4, 5) and got.dtype == torch.float32
    assert torch.allclose(got[:, 0], torch.zeros(2, 4, 5))       # (10 - 10) / 1
    assert torch.allclose(got[:, 1], torch.full((2, 4, 5), 10.0))  # (20 - 0) / 2
    assert torch.allclose(got[:, 2], torch.zeros(2, 4, 5))       # (30 - 30) / 10
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match="no image files"):
        load_image_folder(empty, (3, 4, 5), [0.0] * 3, [1.0] * 3)
    with pytest.raises(InputDataError, match="not a folder"):
        load_image_folder(tmp_path / "x.npy", (3, 4, 5), [0.0] * 3, [1.0] * 3)
