#!/usr/bin/env python
"""Secure-inference client (P0): holds the images, learns only the model's outputs.

Loads images (a .npy array [N, C, H, W] of preprocessed floats, or a folder of image files
normalised with the config's data_preprocessor mean/std and resized to the input shape),
runs them through the secure model served by server.py with crypto_provider.py's help, and
writes the logits and predictions (--output .npz). With --labels (.npy: class indices [N], or
segmentation maps [N, H, W]) it prints top-1 accuracy or mIoU. Writes the run report (--report
JSON; --plot PNG of bytes per layer). Example:

    python research/secure_inference/client.py --config-file session.yaml \\
        --images test_images.npy --labels test_labels.npy --output preds.npz --report run.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import (UserError, add_common_args, build_model, close_party, compile_for, resolve,
                    run_cli, tls_config)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def _preprocessor(cfg: dict) -> tuple[list[float], list[float], bool]:
    from secure_inference.models import is_config_path
    if not is_config_path(cfg["model"]):
        return [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False
    from secure_inference.mmlab.config_utils import load_task_config
    task = load_task_config(cfg["model"], cfg.get("cfg_options"))
    pre = task.get("data_preprocessor") or task.model.get("data_preprocessor") or {}
    mean = list(pre.get("mean", [0.0, 0.0, 0.0]))
    std = list(pre.get("std", [1.0, 1.0, 1.0]))
    return mean, std, bool(pre.get("to_rgb", pre.get("bgr_to_rgb", False)))


def load_images(path: Path, cfg: dict, shape) -> torch.Tensor:
    """[N, C, H, W] float32 images from a .npy file or a folder of image files."""
    if path.suffix == ".npy":
        if not path.is_file():
            raise UserError(f"--images {path}: no such file")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"--images {path}: not a readable .npy array ({exc})") from None
        if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape):
            raise SystemExit(f"{path}: expected an array [N, {', '.join(map(str, shape))}], got "
                             f"{list(arr.shape)}")
        return torch.from_numpy(arr.astype(np.float32))
    if not path.is_dir():
        raise SystemExit(f"--images must be a .npy file or a folder of images: {path}")
    from PIL import Image
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no image files in {path}")
    mean, std, _ = _preprocessor(cfg)
    c, h, w = shape
    out = []
    for f in files:
        img = Image.open(f).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1)
        out.append((arr - np.array(mean[:c], np.float32)[:, None, None]) /
                   np.array(std[:c], np.float32)[:, None, None])
    return torch.from_numpy(np.stack(out))


def metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    """Top-1 accuracy ([N, K] logits) or mIoU ([N, K, h, w] logits vs [N, H, W] maps;
    label 255 ignored; logits resized bilinearly to the label size)."""
    labels_t = torch.from_numpy(labels.astype(np.int64))
    if logits.dim() == 2:
        return {"top1_accuracy": float((logits.argmax(1) == labels_t).double().mean())}
    k = logits.shape[1]
    up = torch.nn.functional.interpolate(logits, size=labels_t.shape[-2:], mode="bilinear",
                                         align_corners=False)
    pred = up.argmax(1)
    valid = labels_t != 255
    inter = torch.bincount(labels_t[valid & (pred == labels_t)], minlength=k)[:k]
    area_p = torch.bincount(pred[valid], minlength=k)[:k]
    area_l = torch.bincount(labels_t[valid], minlength=k)[:k]
    union = area_p + area_l - inter
    present = union > 0
    iou = inter[present].double() / union[present].double()
    return {"mIoU": float(iou.mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(inter.sum() / valid.sum().clamp(min=1))}


def load_labels(path: Path, n: int, out_shape: tuple[int, ...]) -> np.ndarray:
    """Labels checked against the images and the model's output before anything runs:
    class indices [N] in [0, K) for [N, K] logits, or maps [N, H, W] (values in [0, K) or
    255) for segmentation logits [N, K, h, w]."""
    if not path.is_file():
        raise UserError(f"--labels {path}: no such file")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"--labels {path}: not a readable .npy array ({exc})") from None
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise UserError(f"--labels {path}: holds {labels.dtype} values; labels are integer "
                        "class indices")
    k = int(out_shape[1])
    want = 1 if len(out_shape) == 2 else 3
    what = "class indices [N]" if want == 1 else "segmentation maps [N, H, W]"
    if labels.ndim != want or labels.shape[0] != n:
        raise UserError(f"--labels {path}: shape {list(labels.shape)}, expected {what} for "
                        f"{n} image(s) (the model's output is {list(out_shape[1:])} per image)")
    valid = labels if want == 1 else labels[labels != 255]
    if valid.size and (valid.min() < 0 or valid.max() >= k):
        raise UserError(f"--labels {path}: values outside [0, {k}) (the model has {k} classes)")
    return labels


def check_writable(path: Path | None, flag: str) -> None:
    """Refuse an output path that cannot be written, before the secure run spends its time."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or \
            (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write there (permission denied or not a folder)")


def save_logits(path: Path, logits: torch.Tensor) -> None:
    """The logits and predictions (.npz), written as soon as the secure run has them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, logits=logits.numpy(), predictions=logits.argmax(1).numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help=".npy [N,C,H,W] or a folder")
    parser.add_argument("--labels", type=Path, help=".npy class indices [N] or maps [N,H,W]")
    parser.add_argument("--batch-size", type=int, help="images per secure batch (default 1)")
    parser.add_argument("--output", type=Path, help="write logits and predictions (.npz)")
    parser.add_argument("--report", type=Path, help="write the run report (JSON)")
    parser.add_argument("--plot", type=Path, help="write a PNG of bytes per layer")
    add_common_args(parser)
    args = parser.parse_args(argv)
    cfg = resolve(args)
    # every input is checked before connecting: nothing the secure run computes is lost to a
    # mistake that could have been seen first
    for path, flag in ((args.output, "--output"), (args.report, "--report"),
                       (args.plot, "--plot")):
        check_writable(path, flag)
    bs = int(cfg["batch_size"])
    if bs < 1:
        raise UserError(f"--batch-size must be at least 1, got {bs}")
    tls_config(0, cfg)
    model, shape = build_model(cfg)
    images = load_images(args.images, cfg, shape)
    if images.shape[0] == 0:
        raise UserError(f"--images {args.images} holds no images (0 images): nothing to run")
    batches = list(images.split(bs))
    program, _ = compile_for(model, shape, bs)
    del model
    labels = None
    if args.labels is not None:
        labels = load_labels(args.labels, images.shape[0],
                             tuple(program.layers[program.output].shape))
    from secure_inference.mpc.party import gather_results, run_party
    from secure_inference.mpc.report import build_report, plot_report, save_report
    from common import connect, drelu
    party = connect(0, cfg)
    try:
        with tqdm(total=len(images), desc="secure inference", unit="img") as bar:
            result = run_party(party, program, images=batches, drelu=drelu(cfg),
                               on_batch=bar.update)
    except BaseException as exc:
        close_party(party, exc)
        raise
    logits = torch.cat(result["outputs"]).float()
    if args.output is not None:      # before the report exchange, which can still fail
        save_logits(args.output, logits)
    meta = {"model": cfg["model"], "spec": cfg.get("spec"), "frac_bits": cfg["frac_bits"],
            "drelu": str(drelu(cfg) or "exact"), "tls": not cfg["plaintext"],
            "server": cfg["server"], "helper": cfg["helper"]}
    scores = metrics(logits, labels) if labels is not None else {}
    try:
        results = gather_results(party, result)
    except BaseException as exc:
        close_party(party, exc)
        saved = (f"the logits are saved in {args.output}" if args.output is not None else
                 "no --output was given, so the logits were not saved")
        note = f"the report exchange with the server and helper failed: {exc}"
        if args.report is not None:
            partial = {"complete": False, "note": note, "meta": meta,
                       "images": int(images.shape[0]), "batch_sizes": result["batch_sizes"],
                       "client": {k: result[k] for k in ("setup_seconds", "preprocess_seconds",
                                                         "online_seconds", "cpu_seconds")},
                       "metrics": scores, "output": str(args.output) if args.output else None}
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(partial, indent=1))
        raise UserError(f"{note}; {saved}"
                        + (f"; a partial report is in {args.report}" if args.report else ""))
    party.close()
    report = build_report(program, results, meta=meta)
    per = report["per_image"]
    summary = {"images": report["images"], "online_seconds_per_image": per["online_seconds"],
               "preprocess_seconds_per_image": per["preprocess_seconds"],
               "online_MB_per_image": per["online_bytes"] / 1e6,
               "preprocess_MB_per_image": per["preprocess_bytes"] / 1e6,
               "setup_MB": report["setup"]["bytes"] / 1e6, "rounds": report["online"]["rounds"]}
    if scores:
        summary.update(scores)
        report["metrics"] = scores
    if args.report is not None:
        save_report(report, args.report)
    if args.plot is not None:
        plot_report(report, args.plot)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "client"))
