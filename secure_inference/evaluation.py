"""Inputs and scores of a secure-inference run: images and labels read and checked before
anything runs, top-1 accuracy and mIoU of the revealed logits.

Images are a ``.npy`` array [N, C, H, W] of preprocessed floats, or a folder of image files
resized to the input size and normalised with a mean/std per channel (raw 0..255 pixel
values, as MMLab's data preprocessors use them). Labels are class indices [N] for [N, K]
logits, or segmentation maps [N, H, W] (values in [0, K) or :data:`IGNORE_INDEX`) for
[N, K, h, w] logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"})
IGNORE_INDEX = 255
"""Label value of pixels that no class is scored on."""


class InputDataError(ValueError):
    """Images or labels that cannot be used (the message names the file and the problem)."""


def _load_npy(path: Path, flag: str) -> np.ndarray:
    if not path.is_file():
        raise InputDataError(f"{flag} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputDataError(f"{flag} {path}: not a readable .npy array ({exc})") from None


def load_image_array(path: str | Path, shape: Sequence[int], flag: str = "--images"
                     ) -> torch.Tensor:
    """[N, C, H, W] float32 images of a ``.npy`` file whose per-image shape is ``shape``;
    ``flag`` names the input in error messages."""
    path = Path(path)
    arr = _load_npy(path, flag)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape):
        raise InputDataError(f"{path}: expected an array [N, {', '.join(map(str, shape))}], got "
                             f"{list(arr.shape)}")
    if arr.dtype.kind != "f":
        raise InputDataError(
            f"{path}: the array holds {arr.dtype} values, but {flag} .npy files are "
            "preprocessed float images (normalised as the model was trained, e.g. "
            "(pixel - mean) / std); raw pixels: pass a folder of image files instead (they are "
            "normalised with the config's mean/std), or save float32 preprocessed images")
    return torch.from_numpy(arr.astype(np.float32))


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, by suffix), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: str | Path, shape: Sequence[int], mean: Sequence[float],
                      std: Sequence[float]) -> torch.Tensor:
    """Every image of ``folder`` as [N, C, H, W] float32: converted to RGB (C = 3) or grey,
    resized bilinearly to H x W, ``(pixel - mean) / std`` per channel on 0..255 values."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputDataError(f"not a folder of images: {folder}")
    files = image_files(folder)
    if not files:
        raise InputDataError(f"no image files in {folder}")
    from PIL import Image
    c, h, w = (int(s) for s in shape)
    m = np.array(mean[:c], np.float32)[:, None, None]
    s = np.array(std[:c], np.float32)[:, None, None]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1)
        out.append((arr - m) / s)
    return torch.from_numpy(np.stack(out))


def load_labels(path: str | Path, n: int, out_shape: Sequence[int], flag: str = "--labels"
                ) -> np.ndarray:
    """Labels checked against ``n`` images and the model's output shape ``out_shape`` (with
    its batch dimension) before anything runs: class indices [N] in [0, K) for [N, K]
    logits, maps [N, H, W] (values in [0, K) or 255) for [N, K, h, w] logits."""
    path = Path(path)
    labels = _load_npy(path, flag)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise InputDataError(f"{flag} {path}: holds {labels.dtype} values; labels are integer "
                             "class indices")
    k = int(out_shape[1])
    want = 1 if len(out_shape) == 2 else 3
    what = "class indices [N]" if want == 1 else "segmentation maps [N, H, W]"
    if labels.ndim != want or labels.shape[0] != n:
        raise InputDataError(f"{flag} {path}: shape {list(labels.shape)}, expected {what} for "
                             f"{n} image(s) (the model's output is {list(out_shape[1:])} per "
                             "image)")
    valid = labels if want == 1 else labels[labels != IGNORE_INDEX]
    if valid.size and (valid.min() < 0 or valid.max() >= k):
        raise InputDataError(f"{flag} {path}: values outside [0, {k}) (the model has {k} "
                             "classes)")
    return labels


def top1_accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Share of images whose largest logit ([N, K]) is at the label's class ([N])."""
    labels_t = torch.from_numpy(np.asarray(labels).astype(np.int64))
    return float((logits.argmax(1) == labels_t).double().mean())


def segmentation_scores(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """mIoU and pixel accuracy of [N, K, h, w] logits against [N, H, W] maps: the logits are
    resized bilinearly to H x W, pixels labelled 255 are ignored, and the mean IoU runs over
    the classes present in the prediction or the labels (NaN if none)."""
    labels_t = torch.from_numpy(np.asarray(labels).astype(np.int64))
    k = logits.shape[1]
    up = torch.nn.functional.interpolate(logits, size=labels_t.shape[-2:], mode="bilinear",
                                         align_corners=False)
    pred = up.argmax(1)
    valid = labels_t != IGNORE_INDEX
    inter = torch.bincount(labels_t[valid & (pred == labels_t)], minlength=k)[:k]
    area_p = torch.bincount(pred[valid], minlength=k)[:k]
    area_l = torch.bincount(labels_t[valid], minlength=k)[:k]
    union = area_p + area_l - inter
    present = union > 0
    iou = inter[present].double() / union[present].double()
    return {"mIoU": float(iou.mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(inter.sum() / valid.sum().clamp(min=1))}


def score(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """``{"top1_accuracy"}`` for [N, K] logits, ``{"mIoU", "pixel_accuracy"}`` for
    segmentation logits [N, K, h, w]."""
    if logits.dim() == 2:
        return {"top1_accuracy": top1_accuracy(logits, labels)}
    return segmentation_scores(logits, labels)
