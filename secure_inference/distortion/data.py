"""Distortion samples: the model's real (normalised) inputs, drawn reproducibly.

* MMLab configs carry ``secure_inference = dict(input_shape=[C, H, W], distortion_data=dict(
  <dataset cfg: the training images with the deterministic test pipeline>))``. The dataset is
  built with the registry of the config's ``default_scope`` (mmpretrain or mmseg), N indices
  are drawn by a permutation seeded with the recorded seed, and each batch goes through the
  model's ``data_preprocessor`` (normalisation, channel order, padding) exactly as in testing.
* Plain torch models: an image folder, resized (shorter side) and centre-cropped to H×W,
  scaled to [0, 1] and normalised with a given mean/std.

The seed only makes the sample choice reproducible; it is recorded in the results, not secret.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..mmlab.datasets import build_distortion_dataset
from .base import DistortionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_indices(length: int, num_samples: int, seed: int) -> np.ndarray:
    """The first ``num_samples`` of a seeded permutation of range(length)."""
    if num_samples < 1:
        raise DistortionError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > length:
        raise DistortionError(f"num_samples={num_samples} but the dataset has only {length} "
                              "images; lower --num_samples")
    return np.random.default_rng(int(seed)).permutation(length)[:num_samples]


def load_distortion_dataset(cfg):
    """``cfg.secure_inference.distortion_data`` built with the config's registry
    (:func:`secure_inference.mmlab.datasets.build_distortion_dataset`), with every failure a
    :class:`DistortionError` that says what to fix, and an empty dataset refused."""
    try:
        dataset = build_distortion_dataset(cfg)
    except ValueError as e:     # no distortion_data entry
        raise DistortionError(f"{e}; add secure_inference = dict(input_shape=[C, H, W], "
                              "distortion_data=dict(<dataset cfg: training images, test "
                              "pipeline>)) or use --model/--image-folder") from None
    except Exception as e:  # dataset constructors raise many types (missing files, bad keys)
        raise DistortionError(f"cannot build secure_inference.distortion_data: "
                              f"{type(e).__name__}: {e}") from None
    if len(dataset) == 0:
        raise DistortionError("secure_inference.distortion_data is empty; check its data_root "
                              "and ann_file")
    return dataset


def config_samples(cfg, model: nn.Module, num_samples: int, seed: int,
                   input_shape: Sequence[int] | None = None, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """N preprocessed samples [N, C, H, W] (CPU float32) from the config's distortion data."""
    from ..mmlab.datasets import preprocessed_batches
    dataset = load_distortion_dataset(cfg)
    idx = sample_indices(len(dataset), num_samples, seed)
    if getattr(model, "data_preprocessor", None) is None:
        raise DistortionError("the model has no data_preprocessor; build it from an MMLab "
                              "config")
    model.data_preprocessor.cpu()  # on CPU: samples (and their hash) match on every device
    out = []
    for inputs, _ in preprocessed_batches(dataset, model, idx, batch_size):
        if not torch.is_tensor(inputs) or inputs.dim() != 4:
            raise DistortionError("the data_preprocessor did not return a [N, C, H, W] batch; "
                                  "the distortion pipeline must give same-size images")
        out.append(inputs.float().cpu())
        if progress is not None:
            progress(len(inputs))
    samples = torch.cat(out)
    if input_shape is not None and tuple(samples.shape[1:]) != tuple(input_shape):
        raise DistortionError(f"secure_inference.distortion_data yields samples of shape "
                              f"{list(samples.shape[1:])}, but the input shape is "
                              f"{list(input_shape)}: make its pipeline resize/crop to the input "
                              "shape")
    if not bool(torch.isfinite(samples).all()):
        raise DistortionError("preprocessed samples contain NaN/inf")
    return samples


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DistortionError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DistortionError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def folder_samples(folder: str | os.PathLike, input_shape: Sequence[int], num_samples: int,
                   seed: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """N images of a folder as normalised [N, C, H, W] float32: shorter side resized to the
    target's, centre-cropped, scaled to [0, 1], ``(x - mean) / std`` per channel."""
    from PIL import Image
    c, h, w = (int(s) for s in input_shape)
    if c not in (1, 3):
        raise DistortionError(f"image folders give 1 or 3 channels, input shape asks for {c}")
    if len(mean) != c or len(std) != c:
        raise DistortionError(f"mean/std need {c} values, got {len(mean)}/{len(std)}")
    files = list_images(folder)
    idx = sample_indices(len(files), num_samples, seed)
    out = torch.empty((len(idx), c, h, w))
    for j, i in enumerate(idx):
        try:
            img = Image.open(files[i]).convert("RGB" if c == 3 else "L")
        except OSError as e:
            raise DistortionError(f"cannot read image {files[i]}: {e}") from None
        scale = max(h / img.height, w / img.width)
        size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        arr = arr.reshape(h, w, c).transpose(2, 0, 1)
        out[j] = torch.from_numpy(arr.copy())
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (out - m) / s
