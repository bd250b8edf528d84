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
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import add_common_args, build_model, compile_for, resolve, run_role

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
        arr = np.load(path, allow_pickle=False)
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
    model, shape = build_model(cfg)
    images = load_images(args.images, cfg, shape)
    bs = int(cfg["batch_size"])
    batches = list(images.split(bs))
    program, _ = compile_for(model, shape, bs)
    del model
    from secure_inference.mpc.party import gather_results, run_party
    from secure_inference.mpc.report import build_report, plot_report, save_report
    from common import connect, drelu
    party = connect(0, cfg)
    try:
        with tqdm(total=len(images), desc="secure inference", unit="img") as bar:
            result = run_party(party, program, images=batches, drelu=drelu(cfg),
                               on_batch=bar.update)
        results = gather_results(party, result)
    finally:
        party.close()
    logits = torch.cat(result["outputs"]).float()
    meta = {"model": cfg["model"], "spec": cfg.get("spec"), "frac_bits": cfg["frac_bits"],
            "drelu": str(drelu(cfg) or "exact"), "tls": not cfg["plaintext"],
            "server": cfg["server"], "helper": cfg["helper"]}
    report = build_report(program, results, meta=meta)
    per = report["per_image"]
    summary = {"images": report["images"], "online_seconds_per_image": per["online_seconds"],
               "preprocess_seconds_per_image": per["preprocess_seconds"],
               "online_MB_per_image": per["online_bytes"] / 1e6,
               "preprocess_MB_per_image": per["preprocess_bytes"] / 1e6,
               "setup_MB": report["setup"]["bytes"] / 1e6, "rounds": report["online"]["rounds"]}
    if args.labels is not None:
        labels = np.load(args.labels, allow_pickle=False)
        if labels.shape[0] != logits.shape[0]:
            raise SystemExit(f"{args.labels} has {labels.shape[0]} labels for "
                             f"{logits.shape[0]} images")
        summary.update(metrics(logits, labels))
        report["metrics"] = {k: v for k, v in summary.items() if k in ("top1_accuracy", "mIoU",
                                                                     "pixel_accuracy")}
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.output, logits=logits.numpy(), predictions=logits.argmax(1).numpy())
    if args.report is not None:
        save_report(report, args.report)
    if args.plot is not None:
        plot_report(report, args.plot)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
