"""Secure-inference client (P0): holds the images, learns only the model's outputs.

Loads images (a .npy array [N, C, H, W] of preprocessed floats, or a folder of image files
normalised with the config's data_preprocessor mean/std and resized to the input shape),
runs them through the secure model served by server.py with crypto_provider.py's help, and
writes the logits and predictions (--output .npz). With --labels (.npy: class indices [N], or
segmentation maps [N, H, W]) it prints top-1 accuracy or mIoU. Writes the run report (--report
JSON; --plot PNG of bytes per layer). Example:

    si-client --config-file session.yaml \\
        --images test_images.npy --labels test_labels.npy --output preds.npz --report run.json
    (or: python research/secure_inference/client.py ... with the same flags)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._party import (UserError, add_common_args, build_model, check_addresses, close_party,
                     compile_for, connect, model_config, options_for, resolve, run_cli,
                     tls_config)


def build_parser() -> argparse.ArgumentParser:
    """The client's flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help=".npy [N,C,H,W] or a folder")
    parser.add_argument("--labels", type=Path, help=".npy class indices [N] or maps [N,H,W]")
    parser.add_argument("--batch-size", type=int, help="images per secure batch (default 1)")
    parser.add_argument("--output", type=Path, help="write logits and predictions (.npz)")
    parser.add_argument("--report", type=Path, help="write the run report (JSON)")
    parser.add_argument("--plot", type=Path, help="write a PNG of bytes per layer")
    add_common_args(parser)
    return parser


def preprocessor(cfg: dict, task_cfg=None) -> tuple[list[float], list[float], bool]:
    """Mean, std and to-RGB of the session model's data preprocessor (ImageNet's for a
    torchvision model); ``task_cfg``: the model's config if loaded already."""
    from secure_inference.models import is_config_path
    if not is_config_path(cfg["model"]):
        return [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False
    task = model_config(cfg) if task_cfg is None else task_cfg
    pre = task.get("data_preprocessor") or task.model.get("data_preprocessor") or {}
    mean = list(pre.get("mean", [0.0, 0.0, 0.0]))
    std = list(pre.get("std", [1.0, 1.0, 1.0]))
    return mean, std, bool(pre.get("to_rgb", pre.get("bgr_to_rgb", False)))


def load_images(path: Path, cfg: dict, shape, task_cfg=None):
    """[N, C, H, W] float32 images from a .npy file or a folder of image files (``task_cfg``:
    the model's config if loaded already, for the folder's normalisation)."""
    from secure_inference.evaluation import load_image_array, load_image_folder
    if path.suffix == ".npy":
        return load_image_array(path, shape)
    if not path.is_dir():
        raise UserError(f"--images must be a .npy file or a folder of images: {path}")
    mean, std, _ = preprocessor(cfg, task_cfg)
    return load_image_folder(path, shape, mean, std)


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


def save_logits(path: Path, logits) -> None:
    """The logits and predictions (.npz), written as soon as the secure run has them."""
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, logits=logits.numpy(), predictions=logits.argmax(1).numpy())


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the images through the secure model (errors propagate; see
    :func:`main`)."""
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    # every input is checked before connecting: nothing the secure run computes is lost to a
    # mistake that could have been seen first
    for path, flag in ((args.output, "--output"), (args.report, "--report"),
                       (args.plot, "--plot")):
        check_writable(path, flag)
    bs = int(cfg["batch_size"])
    if bs < 1:
        raise UserError(f"--batch-size must be at least 1, got {bs}")
    check_addresses(cfg)
    tls = tls_config(0, cfg)
    options = options_for(cfg)
    import torch
    from tqdm import tqdm

    from secure_inference.evaluation import load_labels, score
    from secure_inference.mpc.party import gather_results, run_party
    from secure_inference.mpc.report import build_report, plot_report, save_report
    task_cfg = model_config(cfg)    # loaded once: shape, model and normalisation
    model, shape = build_model(cfg, task_cfg=task_cfg)
    images = load_images(args.images, cfg, shape, task_cfg)
    if images.shape[0] == 0:
        raise UserError(f"--images {args.images} holds no images (0 images): nothing to run")
    from secure_inference.mpc.ring import check_inputs
    check_inputs(images, options.frac_bits, what=f"--images {args.images}")
    batches = list(images.split(bs))
    program, _ = compile_for(model, shape, bs, cfg)
    del model
    labels = None
    if args.labels is not None:
        labels = load_labels(args.labels, images.shape[0],
                             tuple(program.layers[program.output].shape))
    party = connect(0, cfg, options, tls)
    try:
        with tqdm(total=len(images), desc="secure inference", unit="img") as bar:
            result = run_party(party, program, images=batches, on_batch=bar.update)
    except BaseException as exc:
        close_party(party, exc)
        raise
    logits = torch.cat(result["outputs"]).float()
    if args.output is not None:      # before the report exchange, which can still fail
        save_logits(args.output, logits)
    meta = {"model": cfg["model"], "spec": cfg.get("spec"), "frac_bits": cfg["frac_bits"],
            "drelu": str(options.drelu or "exact"),
            "drelu_widths": sorted(set(program.widths().values())), "prg": cfg["prg"],
            "preprocess": options.preprocess, "tls": not cfg["plaintext"],
            "server": cfg["server"], "helper": cfg["helper"]}
    scores = score(logits, labels) if labels is not None else {}
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
               "setup_MB": report["setup"]["bytes"] / 1e6, "rounds": report["online"]["rounds"],
               "estimated_seconds_per_image": {
                   name: round(v["seconds_per_image"], 3)
                   for name, v in report["networks"].items() if isinstance(v, dict)}}
    if scores:
        summary.update(scores)
        report["metrics"] = scores
    if args.report is not None:
        save_report(report, args.report)
    if args.plot is not None:
        plot_report(report, args.plot)
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: user errors are one line on stderr and exit status 1."""
    return run_cli(run, "client", argv)


if __name__ == "__main__":
    sys.exit(main())
